"""A quantized base on the GPU (``pytest -m gpu``): the Triton kernels' logits equal transformers'
on the dequantized weights, and decode replayed from CUDA graphs equals eager decode."""

from __future__ import annotations

import copy

import pytest
import torch
from hotmerge.engine.batch import DecodeRow, PrefillChunk
from hotmerge_kernels.quant import FORMATS

from tests.server.test_quantized_engine import (
    dequantized_copy,
    hf_model,
    random_adapter,
    runner_for,
)

SMALL_PREFILL = 64  # the prompts here are short: fewer prefill graphs to warm up and capture

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_graph_logits_equal_transformers_on_the_dequantized_weights(fmt):
    model = hf_model().cuda()
    ref = dequantized_copy(model, fmt)
    ids = torch.randint(3, 259, (1, 17), generator=torch.Generator().manual_seed(1))[0].tolist()
    with torch.inference_mode():
        want = ref(torch.tensor([ids], device="cuda")).logits[0].float()
    runner = runner_for(model, fmt, max_prefill_tokens=SMALL_PREFILL)
    assert runner._graphs
    prompt, steps = ids[:12], ids[12:]
    table = [1, 2, 3, 4, 5]
    logits, _ = runner.prefill([PrefillChunk(0, prompt, 0, table, -1, True)])
    torch.testing.assert_close(logits[0], want[len(prompt) - 1], atol=1e-3, rtol=1e-3)
    for i, token in enumerate(steps):
        position = len(prompt) + i
        out = runner.decode([DecodeRow(0, token, position, table, -1)])
        torch.testing.assert_close(out[0], want[position], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_graph_decode_equals_eager_on_a_quantized_base(fmt):
    """bf16, rows on the base and on an adapter: the same padded sizes run the same kernels."""
    model = hf_model().to("cuda", torch.bfloat16)
    adapter = random_adapter(model, 1, device="cuda")
    runners = [
        runner_for(copy.deepcopy(model), fmt, cuda_graphs=graphs, max_prefill_tokens=SMALL_PREFILL)
        for graphs in (True, False)
    ]
    assert runners[0]._graphs and not runners[1]._graphs
    outs = []
    for runner in runners:
        runner.adapters.write(0, adapter)
        slots = (-1, 0)
        tables = [[1, 2, 3], [4, 5, 6]]
        chunks = [PrefillChunk(i, [5 + i, 6, 7, 8], 0, tables[i], slots[i], True) for i in range(2)]
        runner.prefill(chunks)
        step = []
        for pos in range(4, 10):
            rows = [DecodeRow(i, 40 + pos, pos, tables[i], slots[i]) for i in range(2)]
            step.append(runner.decode(rows).clone())
        outs.append(torch.stack(step))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
