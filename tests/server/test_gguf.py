"""GGUF models: a tiny random Llama written with the ``gguf`` package, converted once and
served by hotmerge's own forward with transformers' logits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hotmerge.engine.models.gguf import MARKER, converted_dir, gguf_file, resolve_model
from hotmerge.errors import InvalidArgument
from hotmerge.generation import GenerationRequest, SamplingParams

from tests.helpers import make_engine, make_peft_adapter

gguf = pytest.importorskip("gguf")

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_gguf(path: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A random Llama (4 heads, 2 KV heads, tied embeddings) with a byte-level BPE tokenizer
    and a chat template, in float32 tensors."""
    from tokenizers import pre_tokenizers

    rng = np.random.default_rng(seed)
    heads, kv_heads, inter = 4, 2, 2 * hidden
    head_dim = hidden // heads
    tokens = [*SPECIALS, *sorted(pre_tokenizers.ByteLevel.alphabet()), "he"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(["h e"])  # transformers wants at least one merge
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(TEMPLATE)

    def add(name: str, *shape: int, scale: float = 0.1, offset: float = 0.0) -> None:
        w.add_tensor(name, (offset + scale * rng.standard_normal(shape)).astype(np.float32))

    add("token_embd.weight", len(tokens), hidden, scale=0.5)  # no output.weight: tied
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", hidden, offset=1.0)
        add(f"blk.{i}.ffn_norm.weight", hidden, offset=1.0)
        add(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        add(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        add(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        add(f"blk.{i}.ffn_gate.weight", inter, hidden)
        add(f"blk.{i}.ffn_up.weight", inter, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, inter)
    add("output_norm.weight", hidden, offset=1.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    (tmp / "src").mkdir()
    path = write_tiny_gguf(tmp / "src" / "tiny.gguf")
    model_dir = Path(resolve_model(str(path), tmp / "models"))
    engine = make_engine(model_dir, tmp / "adapters")
    yield path, tmp, model_dir, engine
    engine.stop()


def test_converted_once_and_reused(tiny):
    path, tmp, model_dir, _ = tiny
    assert model_dir == converted_dir(path, tmp / "models") and (model_dir / MARKER).is_file()
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(path.parent), tmp / "models") == str(model_dir)  # folder of one
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert gguf_file(model_dir) is None and resolve_model(str(model_dir), tmp) == str(model_dir)


def test_a_changed_file_is_converted_again(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    model_dir = Path(resolve_model(str(path), tmp_path / "models"))
    assert model_dir.name == "m"
    record = (model_dir / MARKER).read_text()
    os.utime(path, ns=(1, 1))
    assert resolve_model(str(path), tmp_path / "models") == str(model_dir)
    assert (model_dir / MARKER).read_text() != record  # converted again, in the same place


def test_several_ggufs_in_a_folder_is_a_clear_error(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="several GGUF files"):
        resolve_model(str(tmp_path), tmp_path / "models")


def test_forward_gives_transformers_logits(tiny):
    """hotmerge's forward on the converted folder against transformers reading the GGUF itself:
    same prompt logprobs, same greedy tokens (tied embeddings, its tokenizer and template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _, _, engine = tiny
    assert engine.runner.__class__.__name__ == "LlamaRunner"
    folder, name = str(path.parent), path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hello there"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        want_prompt = logprobs.gather(1, ids[0, 1:, None])[:, 0].tolist()
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=2)
    params = SamplingParams(max_new_tokens=8, prompt_logprobs=True)
    result = engine.submit(GenerationRequest(text, params, None)).wait()
    assert [t.token_id for t in result.prompt] == ids[0].tolist()
    assert [t.logprob for t in result.prompt[1:]] == pytest.approx(want_prompt, abs=1e-4)
    want_tokens = out[0, ids.shape[1] :].tolist()
    got = [t.token_id for t in result.tokens]
    assert got == want_tokens[: len(got)] and (len(got) == 8 or got[-1] == 2)


def test_embedded_default_serves_the_shipped_adapters(tmp_path, monkeypatch):
    """The SmolLM2 default's set-up, on a tiny GGUF: random demo adapters of the model's shapes
    while no skill adapters are shipped; the shipped ones (copied, kept in step) once there are."""
    import hotmerge.smollm2 as smollm2
    from hotmerge.embedded import DEMO_ADAPTERS, ensure_embedded

    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(smollm2, "smollm2_gguf", lambda: source)
    monkeypatch.setattr(smollm2, "SHIPPED_ADAPTERS", tmp_path / "shipped")
    model_dir, root = ensure_embedded(tmp_path / "data", kind="smollm2")
    assert model_dir.name == smollm2.MODEL_NAME
    assert sorted(p.name for p in root.iterdir()) == [a.name for a in DEMO_ADAPTERS]

    shipped = make_peft_adapter(model_dir, tmp_path / "shipped" / "sql", seed=3, scale=20.0)
    (shipped / "training.json").write_text("{}\n")
    assert ensure_embedded(tmp_path / "data", kind="smollm2") == (model_dir, root)
    for name in ("adapter_config.json", "adapter_model.safetensors", "training.json"):
        assert (root / "sql" / name).read_bytes() == (shipped / name).read_bytes()
    make_peft_adapter(model_dir, shipped, seed=4, scale=20.0)  # a retrained adapter replaces it
    ensure_embedded(tmp_path / "data", kind="smollm2")
    assert (root / "sql" / "adapter_model.safetensors").read_bytes() == (
        shipped / "adapter_model.safetensors"
    ).read_bytes()
    engine = make_engine(model_dir, root)
    try:
        outs = {
            a: engine.submit(GenerationRequest("hello", SamplingParams(max_new_tokens=6), a))
            .wait()
            .tokens
            for a in (None, "sql")
        }
    finally:
        engine.stop()
    assert [t.token_id for t in outs[None]] != [t.token_id for t in outs["sql"]]
