"""The embedded default model and demo adapters: real PEFT format, same tokens as PEFT."""

from __future__ import annotations

import json

import pytest
from hotmerge.embedded import DEMO_ADAPTERS, ensure_embedded
from hotmerge.generation import GenerationRequest, SamplingParams
from safetensors import safe_open

from tests.helpers import make_engine, peft_greedy

PROMPT = "hello, world"
N_TOKENS = 8


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    model_dir, adapter_root = ensure_embedded(data_dir)
    engine = make_engine(model_dir, adapter_root)
    yield data_dir, model_dir, adapter_root, engine
    engine.stop()


def test_build_is_idempotent(embedded):
    data_dir, model_dir, adapter_root, _ = embedded
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_embedded(data_dir) == (model_dir, adapter_root)
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in adapter_root.iterdir()) == [a.name for a in DEMO_ADAPTERS]


def test_demo_adapters_are_in_peft_format(embedded):
    _, model_dir, adapter_root, _ = embedded
    for spec in DEMO_ADAPTERS:
        config = json.loads((adapter_root / spec.name / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
        assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (
            8,
            spec.alpha,
            spec.use_rslora,
        )
        assert sorted(config["target_modules"]) == sorted(spec.target_modules)
        with safe_open(str(adapter_root / spec.name / "adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())  # noqa: SIM118
            assert (
                f"base_model.model.model.layers.0.self_attn.{spec.target_modules[0]}.lora_A.weight"
                in keys
                or spec.name == "demo-c"
            )
            assert all(k.startswith("base_model.model.model.layers.") for k in keys)
            assert len(keys) == 2 * 4 * len(spec.target_modules)


def test_tokenizer_round_trips_bytes(embedded):
    _, _, _, engine = embedded
    tok = engine.runner.tokenizer
    text = "héllo ✓ 日本"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len(text.encode())
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


@pytest.mark.parametrize("adapter_id", [None] + [a.name for a in DEMO_ADAPTERS])
def test_peft_gives_the_same_greedy_tokens(embedded, adapter_id):
    _, model_dir, adapter_root, engine = embedded
    adapter_dir = None if adapter_id is None else adapter_root / adapter_id
    want_tokens, want_logprobs = peft_greedy(model_dir, adapter_dir, PROMPT, N_TOKENS)
    request = GenerationRequest(PROMPT, SamplingParams(max_new_tokens=N_TOKENS), adapter_id)
    result = engine.submit(request).wait()
    assert [t.token_id for t in result.tokens] == want_tokens
    assert [t.logprob for t in result.tokens] == pytest.approx(want_logprobs, abs=1e-4)


def test_demo_adapters_visibly_differ(embedded):
    _, _, _, engine = embedded
    outputs = set()
    for adapter_id in [None] + [a.name for a in DEMO_ADAPTERS]:
        request = GenerationRequest(PROMPT, SamplingParams(max_new_tokens=N_TOKENS), adapter_id)
        outputs.add(tuple(t.token_id for t in engine.submit(request).wait().tokens))
    assert len(outputs) == 1 + len(DEMO_ADAPTERS)


def test_truncated_demo_adapter_is_rebuilt_at_start(tmp_path):
    model_dir, adapter_root = ensure_embedded(tmp_path)
    weights = adapter_root / "demo-b" / "adapter_model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # e.g. a disk filled mid-copy
    (adapter_root / "mine").mkdir()  # a user's adapter next to the demos stays
    assert ensure_embedded(tmp_path) == (model_dir, adapter_root)
    assert weights.read_bytes() == whole and (adapter_root / "mine").is_dir()


def test_killed_build_leaves_nothing_that_counts(tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "import os, hotmerge.embedded as e\n"
        "real = e.write_peft_adapter\n"
        "def dies(*a, **k):\n"
        "    real(*a, **k)\n"
        "    os.kill(os.getpid(), 9)\n"  # SIGKILL mid-build, after one adapter
        "e.write_peft_adapter = dies\n"
        f"e.ensure_embedded({str(tmp_path)!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=300)
    assert proc.returncode == -9
    assert list(tmp_path.glob(".embedded-*-*")) and not (tmp_path / ".embedded-complete").exists()
    model_dir, adapter_root = ensure_embedded(tmp_path)  # builds, and clears the dead temp dir
    assert not list(tmp_path.glob(".embedded-*-*")) and (tmp_path / ".embedded-complete").exists()
    assert sorted(p.name for p in adapter_root.iterdir()) == [a.name for a in DEMO_ADAPTERS]
