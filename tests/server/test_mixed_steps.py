"""Mixed steps end to end (CPU, float32, greedy, tiny model): prompts prefilled in the same
forward as running rows' decode give every row the tokens it gets in steps of its own."""

from __future__ import annotations

import pytest
from hotmerge.generation import GenerationRequest, SamplingParams

from tests.helpers import make_engine, make_peft_adapter, tiny_llama

PROMPT = "You are a helpful assistant. Answer briefly. Question {}: "


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    model_dir = tiny_llama(tmp)
    make_peft_adapter(model_dir, tmp / "adapters" / "qv", r=4, alpha=8, seed=1, scale=2.0)
    engine = make_engine(
        model_dir,
        tmp / "adapters",
        max_batch_size=4,
        block_size=4,
        max_prefill_tokens=16,  # prompts of ~60 tokens take several mixed steps
        prefix_caching=False,
        batch_wait_ms=1,
    )
    yield engine
    engine.stop()


def request(i: int, adapter_id=None, max_new_tokens=12) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return GenerationRequest(PROMPT.format(i), params, adapter_id)


def token_ids(result) -> list[int]:
    return [t.token_id for t in result.tokens]


def test_prompts_joining_running_rows_get_the_tokens_of_separate_steps(engine):
    cases = [(0, None, 40), (1, "qv", 12), (2, None, 12), (3, "qv", 30)]
    alone = [token_ids(engine.submit(request(*case)).wait()) for case in cases]
    plans = engine.scheduler.mixed_plans
    mixed_rows = sum(engine.stats.mixed_decode_rows.values())
    first = engine.submit(request(*cases[0]))
    events = iter(first)
    streamed = [next(events).token_id]  # it decodes now: the others' prompts join its steps
    later = [engine.submit(request(*case)) for case in cases[1:]]
    streamed += [e.token_id for e in events]
    together = [streamed, *(token_ids(h.wait()) for h in later)]
    assert engine.scheduler.mixed_plans > plans
    # every mixed step's decode rows are counted (the rows-per-step histogram serve_load reads)
    assert sum(engine.stats.mixed_decode_rows.values()) - mixed_rows == (
        engine.scheduler.mixed_plans - plans
    )
    assert together == alone
    assert engine.kv.free_blocks == engine.kv.capacity_blocks


def test_without_mixed_steps_the_tokens_are_the_same(engine, monkeypatch):
    cases = [(4, "qv", 20), (5, None, 8)]
    monkeypatch.setattr(engine.scheduler, "mixed_steps", False)
    plans = engine.scheduler.mixed_plans
    first = engine.submit(request(*cases[0]))
    events = iter(first)
    streamed = [next(events).token_id]
    second = engine.submit(request(*cases[1]))
    streamed += [e.token_id for e in events]
    separate = [streamed, token_ids(second.wait())]
    monkeypatch.undo()
    assert engine.scheduler.mixed_plans == plans
    assert separate == [token_ids(engine.submit(request(*case)).wait()) for case in cases]


def test_prefill_buffers_lay_out_decode_rows_and_prompt_chunks():
    import torch
    from hotmerge.engine.batch import PrefillBuffers, PrefillChunk

    buf = PrefillBuffers(max_tokens=16, max_seqs=4, max_blocks=4, device=torch.device("cpu"))
    chunks = [
        PrefillChunk(0, [7], start=5, block_table=[3, 9], slot=1, last=True),  # a decode row
        PrefillChunk(1, [4, 5, 6], start=2, block_table=[2, 8], slot=-1, last=False),
    ]
    assert buf.fill(chunks, padded=6, block_size=4) == 4
    assert buf.input_ids[:6].tolist() == [7, 4, 5, 6, 0, 0]
    assert buf.positions[:6].tolist() == [5, 2, 3, 4, 0, 0]
    # position p of a chunk lives in block table[p // 4] at offset p % 4; padding: not written
    assert buf.slot_mapping[:6].tolist() == [9 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 8 * 4 + 0, -1, -1]
    assert buf.lora_slots[:6].tolist() == [1, -1, -1, -1, -1, -1]
    # the decode row is the decode attention's (its length with its token), not the prefill's
    assert buf.query_start[:2].tolist() == [0, 1] and buf.query_lens[:4].tolist() == [0, 3, 0, 0]
    assert buf.row_lens[:4].tolist() == [6, 0, 0, 0]
    assert buf.query_pos[:2].tolist() == [5, 2] and buf.last[:2].tolist() == [0, 3]
    assert buf.block_tables[:2].tolist() == [[3, 9, 0, 0], [2, 8, 0, 0]]


def test_only_the_one_token_chunks_in_front_are_rows():
    """Leading one-token chunks go to the decode attention; a one-token chunk after a prompt
    stays the prefill kernel's (its token is not at its chunk's index)."""
    import torch
    from hotmerge.engine.batch import PrefillBuffers, PrefillChunk, leading_rows

    buf = PrefillBuffers(max_tokens=16, max_seqs=4, max_blocks=4, device=torch.device("cpu"))
    chunks = [
        PrefillChunk(0, [7], start=5, block_table=[3, 9], slot=1, last=True),
        PrefillChunk(1, [8], start=0, block_table=[4], slot=-1, last=True),  # a 1-token prompt
        PrefillChunk(2, [4, 5], start=2, block_table=[2], slot=-1, last=True),
        PrefillChunk(3, [6], start=9, block_table=[1, 5, 6], slot=0, last=True),
    ]
    assert leading_rows(chunks) == 2 and leading_rows(chunks[2:]) == 0
    buf.fill(chunks, padded=8, block_size=4)
    assert buf.row_lens[:4].tolist() == [6, 1, 0, 0]
    assert buf.query_lens[:4].tolist() == [0, 0, 2, 1]
    buf.fill(chunks[2:], padded=8, block_size=4)  # no rows: every length is the prefill's
    assert buf.row_lens[:4].tolist() == [0, 0, 0, 0] and buf.query_lens[:2].tolist() == [2, 1]


def test_prefill_token_counts_have_midpoints_from_128():
    """A mixed step of 32 rows and a 128-token prompt (160 tokens) pads to 192, not 256; decode
    batch sizes stay powers of two; the maximum is always a size."""
    from hotmerge.engine.batch import padded_sizes

    prefill = padded_sizes(2048, smallest=16, midpoints_from=128)
    assert prefill == [16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert next(s for s in prefill if s >= 160) == 192
    assert padded_sizes(200, smallest=16, midpoints_from=128) == [16, 32, 64, 128, 192, 200]
    assert padded_sizes(100, midpoints_from=128)[-3:] == [32, 64, 100]
    assert padded_sizes(64) == [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("kind", ["llama", "mistral"])  # mistral: a sliding window
def test_rows_in_a_mixed_step_get_a_decode_steps_logits(kind, monkeypatch):
    """float32: a mixed step's decode rows (the decode attention) get the logits a decode step
    gives them, and the prompt after them the logits it gets when the rows take the prefill
    kernel's path instead."""
    import torch
    from hotmerge.engine import batch
    from hotmerge.engine.batch import DecodeRow, PrefillChunk

    from tests.server.test_engine import hf_model, runner_for

    runner = runner_for(hf_model(kind))
    tables = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    prompts = [[5 + i, 9, 14, 3, 7, 11 + i, 2][: 5 + i] for i in range(2)]
    with torch.inference_mode():
        runner.prefill([PrefillChunk(i, p, 0, tables[i], -1, True) for i, p in enumerate(prompts)])
        rows = [DecodeRow(i, 40 + i, len(p), tables[i], -1) for i, p in enumerate(prompts)]
        alone = runner.decode(rows).clone()
        chunks = [PrefillChunk(r.seq_id, [r.token_id], r.position, r.block_table, -1, True)
                  for r in rows]  # fmt: skip
        chunks.append(PrefillChunk(2, [3, 4, 5, 6, 7, 8], 0, tables[2], -1, True))
        mixed = runner.prefill(chunks)[0].clone()
        monkeypatch.setattr(batch, "leading_rows", lambda _chunks: 0)
        without_rows = runner.prefill(chunks)[0].clone()
    torch.testing.assert_close(mixed[:2], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed, without_rows, atol=1e-5, rtol=1e-5)
