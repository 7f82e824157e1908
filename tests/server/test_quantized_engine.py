"""A quantized base (``--quantize``) in the engine's own forward: logits equal transformers' on
the dequantized weights, and a mixed batch (base, adapter, merge) gives each row what it gets
alone. CPU: the torch twins (the Triton paths are checked in tests/kernels/test_quant.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from hotmerge.config import ServerConfig
from hotmerge.embedded import byte_level_tokenizer
from hotmerge.engine.batch import DecodeRow, PrefillChunk
from hotmerge.engine.config import QUANT_FORMATS, EngineConfig
from hotmerge.engine.loader import build_runner
from hotmerge.engine.models.llama import lora_shapes, module_paths
from hotmerge.errors import InvalidArgument
from hotmerge_kernels.layout import FlatAdapter
from hotmerge_kernels.merge import merge_adapters
from hotmerge_kernels.merge.params import MergeParams, Strategy
from hotmerge_kernels.quant import FORMATS, quantize
from hotmerge_kernels.quant.reference import dequantize

from tests.helpers import tiny_llama

# in_features 128 and 256: whole int4 groups (128) and nf4 blocks (64).
CONFIG = dict(
    vocab_size=259,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_model(kind: str = "llama"):
    import transformers

    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind](**CONFIG)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model.eval()


def dequantized_copy(model, fmt: str):
    """transformers' model with each projection replaced by its quantized-then-dequantized
    self (one projection at a time: the engine's fused q/k/v and gate/up quantize the same,
    since every format's blocks stay within one output row)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in ref.model.layers:
            for name in PROJ:
                parent = layer.self_attn if hasattr(layer.self_attn, name) else layer.mlp
                proj = getattr(parent, name)
                proj.weight.copy_(dequantize(quantize(proj.weight, fmt)))
    return ref


def runner_for(model, quant: str | None, **fields):
    config = EngineConfig(
        max_batch_size=4, block_size=4, kv_cache_tokens=512, max_loras=2, quantize=quant, **fields
    )
    return build_runner("test", model, byte_level_tokenizer(), config)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_logits_equal_transformers_on_the_dequantized_weights(fmt, kind, caplog):
    model = hf_model(kind)
    ref = dequantized_copy(model, fmt)
    ids = torch.randint(3, 259, (1, 17), generator=torch.Generator().manual_seed(1))[0].tolist()
    with torch.inference_mode():
        want = ref(torch.tensor([ids])).logits[0].float()
        unquantized = model(torch.tensor([ids])).logits[0].float()
    caplog.set_level("INFO", logger="hotmerge.engine.runner")
    runner = runner_for(model, fmt)
    assert f"base quantized to {fmt}" in caplog.text
    assert model.model.layers[0].self_attn.q_proj.weight is None  # the 16-bit weights went
    assert runner.model.base_bytes < runner.model.base_bytes_16bit / 3
    prompt, steps = ids[:12], ids[12:]
    table = [1, 2, 3, 4, 5]
    logits, _ = runner.prefill([PrefillChunk(0, prompt, 0, table, -1, True)])
    torch.testing.assert_close(logits[0], want[len(prompt) - 1], atol=1e-4, rtol=1e-4)
    for i, token in enumerate(steps):
        position = len(prompt) + i
        out = runner.decode([DecodeRow(0, token, position, table, -1)])
        torch.testing.assert_close(out[0], want[position], atol=1e-4, rtol=1e-4)
    # and quantization did change the model
    assert (want - unquantized).abs().max() > 1e-2


def random_adapter(model, seed: int, rank: int = 4, device: str = "cpu") -> FlatAdapter:
    groups, paths = lora_shapes(model), module_paths(model)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, (group, name, _) in paths.items():
        fan_in, fan_out = groups[group][name]
        tensors[(path, "A")] = torch.randn(rank, fan_in, generator=gen) * 0.3
        tensors[(path, "B")] = torch.randn(fan_out, rank, generator=gen) * 0.3
    return FlatAdapter.from_tensors(
        tensors, rank=rank, scaling=1.0, dtype=torch.float32, device=device
    )


@pytest.mark.parametrize("fmt", ["nf4", "fp8"])
def test_mixed_batch_on_a_quantized_base_gives_each_row_its_own(fmt):
    """Rows on the base, on an adapter and on a TIES merge of two adapters, prefilled and
    decoded together, get what each gets alone; the three differ."""
    model = hf_model()
    first, second = random_adapter(model, 1), random_adapter(model, 2)
    merged = merge_adapters(
        [first, second], MergeParams(Strategy.TIES, (0.7, 0.5), density=0.5)
    ).adapter
    runner = runner_for(model, fmt)
    runner.adapters.write(0, first)
    runner.adapters.write(1, merged)
    slots = [-1, 0, 1]
    prompts = [[5, 6, 7, 8, 9], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34]]
    tables = [[1, 2], [3, 4], [5, 6]]
    chunks = [PrefillChunk(i, prompts[i], 0, tables[i], slots[i], True) for i in range(3)]
    together, _ = runner.prefill(chunks)
    for i, chunk in enumerate(chunks):
        alone, _ = runner.prefill([chunk])
        torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=1e-5)
    rows = [DecodeRow(i, 40 + i, 5, tables[i], slots[i]) for i in range(3)]
    together = runner.decode(rows)
    for i, row in enumerate(rows):
        alone = runner.decode([row])
        torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=1e-5)
    assert (together[0] - together[1]).abs().max() > 1e-2
    assert (together[1] - together[2]).abs().max() > 1e-2


def test_bad_quantize_settings_are_refused(tmp_path):
    assert QUANT_FORMATS == FORMATS  # the config's list (no kernel import) is the kernels'
    with pytest.raises(ValueError, match="quantize must be one of"):
        EngineConfig(quantize="int3")
    assert ServerConfig(engine=EngineConfig(quantize="nf4")).engine.quantize == "nf4"
    narrow = copy.deepcopy(hf_model())
    narrow.model.layers[0].mlp.down_proj = torch.nn.Linear(256 - 32, 128, bias=False)
    narrow.config.intermediate_size = 256  # only layer 0's down_proj is narrow
    with pytest.raises(InvalidArgument, match="quantize: int4: in_features 224"):
        runner_for(narrow, "int4")
    with pytest.raises(InvalidArgument, match="quantize: needs hotmerge's Llama-family forward"):
        build_runner(
            "test",
            hf_model(),
            byte_level_tokenizer(),
            EngineConfig(kv_cache_tokens=64, quantize="int8", eager_model=True),
        )


def test_server_config_quantizes_the_served_base(tmp_path):
    """``ServerConfig.engine.quantize`` (the CLI's --quantize) reaches the runner; requests
    run."""
    from hotmerge.generation import GenerationRequest, SamplingParams
    from hotmerge.server import build_engine

    model_dir = tiny_llama(tmp_path)  # hidden 64, intermediate 128: whole nf4 blocks
    config = ServerConfig(
        model=str(model_dir),
        data_dir=tmp_path,
        device="cpu",
        engine=EngineConfig(quantize="nf4", kv_cache_tokens=256),
    )
    engine, _ = build_engine(config)
    try:
        assert engine.runner.model.quant == "nf4"
        request = GenerationRequest("hello", SamplingParams(max_new_tokens=4))
        assert 1 <= len(engine.submit(request).wait().tokens) <= 4
    finally:
        engine.stop()
