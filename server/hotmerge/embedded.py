"""The embedded default model and adapters, built under the data dir when no --model is given.

Two kinds, chosen by ``$HOTMERGE_EMBEDDED``:
- ``smollm2`` (the default): SmolLM2-135M-Instruct with the trained skill adapters (smollm2.py);
- ``tiny``: a small random Llama with a byte-level tokenizer and random demo adapters, built
  from a config with a fixed seed. Its text is meaningless; it exists so that the whole path
  (adapters, batching, timings) runs anywhere in seconds, and the tests use it.
The demo adapters are written in PEFT's on-disk format without importing peft.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from hotmerge import settings
from hotmerge.errors import InvalidArgument

log = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2; the 256 bytes follow
SEED = 1234
ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DemoAdapter:
    name: str
    target_modules: tuple[str, ...]
    alpha: float
    rank: int = 8
    use_rslora: bool = False


DEMO_ADAPTERS = (
    DemoAdapter("demo-a", ("q_proj", "v_proj"), 16),
    DemoAdapter("demo-b", ("q_proj", "k_proj", "v_proj", "o_proj"), 32),
    DemoAdapter("demo-c", ("gate_proj", "up_proj", "down_proj"), 8),
    DemoAdapter("demo-d", ALL_PROJ, 16, use_rslora=True),
)


def byte_level_tokenizer():
    """A PreTrainedTokenizerFast over the 256 bytes plus pad/bos/eos; BOS is prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # one printable char per byte
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left"
    )


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    params = dict(
        vocab_size=len(SPECIAL_TOKENS) + 256,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        # Larger than the usual 0.02 so that a random model has some preference between tokens.
        initializer_range=0.05,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def save_tiny_llama(model_dir: Path, *, seed: int = SEED, **config_overrides) -> Path:
    """Write a random LlamaForCausalLM with the byte-level tokenizer into ``model_dir``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_overrides)).eval()
    model.save_pretrained(model_dir)
    byte_level_tokenizer().save_pretrained(model_dir)
    return model_dir


def linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """``{module_path: (in_features, out_features)}`` of a saved Llama's decoder projections."""
    cfg = json.loads((model_dir / "config.json").read_text())
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    per_layer = {
        "self_attn.q_proj": (h, cfg["num_attention_heads"] * head_dim),
        "self_attn.k_proj": (h, kv),
        "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (cfg["num_attention_heads"] * head_dim, h),
        "mlp.gate_proj": (h, inter),
        "mlp.up_proj": (h, inter),
        "mlp.down_proj": (inter, h),
    }
    return {
        f"model.layers.{i}.{name}": shape
        for i in range(cfg["num_hidden_layers"])
        for name, shape in per_layer.items()
    }


def write_peft_adapter(
    out_dir: Path,
    shapes: dict[str, tuple[int, int]],
    spec: DemoAdapter,
    *,
    base_model: str,
    seed: int,
) -> Path:
    """Write random non-zero A and B in PEFT's LoRA format (config + safetensors)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (fan_in, fan_out) in sorted(shapes.items()):
        if module.rsplit(".", 1)[-1] not in spec.target_modules:
            continue
        # x·Aᵀ has entries of order 1; B is big enough that scaling·B·A·x is comparable to the
        # base layer's output, so adapters visibly change the greedy tokens.
        a = torch.randn(spec.rank, fan_in, generator=gen) / math.sqrt(fan_in)
        b = torch.randn(fan_out, spec.rank, generator=gen) * 0.3 / spec.rank
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(spec.target_modules),
        "use_rslora": spec.use_rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


MARKER = ".embedded-complete"
_MARKER_VERSION = 2


def _file_record(path: Path, *, digest: bool) -> list:
    size = path.stat().st_size
    if not digest:
        return [size, None]
    return [size, hashlib.sha256(path.read_bytes()).hexdigest()]


def _built_files(data_dir: Path) -> dict[str, list]:
    """What a complete build wrote: every model file by size, demo adapter files by hash too
    (small, and what a truncated copy would silently change)."""
    files = {}
    for path in sorted((data_dir / "model").rglob("*")):
        if path.is_file():
            files[path.relative_to(data_dir).as_posix()] = _file_record(path, digest=False)
    for spec in DEMO_ADAPTERS:
        for path in sorted((data_dir / "adapters" / spec.name).iterdir()):
            files[path.relative_to(data_dir).as_posix()] = _file_record(path, digest=True)
    return files


def _intact(data_dir: Path) -> bool:
    """Whether the marker's build is still whole on disk (sizes, demo adapter hashes)."""
    try:
        marker = json.loads((data_dir / MARKER).read_text())
        if marker.get("version") != _MARKER_VERSION:
            return False
        for rel, (size, digest) in marker["files"].items():
            if _file_record(data_dir / rel, digest=digest is not None) != [size, digest]:
                log.warning("embedded build: %s changed or is damaged; rebuilding", rel)
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _remove_stale_builds(data_dir: Path) -> None:
    """Temp dirs of builds whose process died (SIGKILL) before it could clean up."""
    for tmp in data_dir.glob(".embedded-*-*"):
        pid = tmp.name.split("-")[1]
        if tmp.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


KINDS = ("smollm2", "tiny")


def ensure_embedded(data_dir: Path | str, kind: str | None = None) -> tuple[Path, Path]:
    """The embedded default of ``kind`` (default: ``$HOTMERGE_EMBEDDED``, else smollm2), built
    under ``data_dir`` once; returns (model dir, adapter root)."""
    kind = kind or settings.embedded_kind() or KINDS[0]
    if kind == "tiny":
        return ensure_tiny(data_dir)
    if kind == "smollm2":
        from hotmerge.smollm2 import ensure_smollm2  # it builds on this module's writers

        return ensure_smollm2(Path(data_dir))
    raise InvalidArgument(
        f"${settings.EMBEDDED_ENV}={kind!r}: the embedded default is one of {KINDS}"
    )


def ensure_tiny(data_dir: Path | str) -> tuple[Path, Path]:
    """Build the tiny random model and demo adapters under ``data_dir`` once; return their dirs.

    Idempotent: a complete build is marked by a file listing what it wrote (sizes; hashes of the
    demo adapters), checked at each start, and rebuilt when damaged. A build is written to a
    temp dir and renamed into place, so an interrupted one is never mistaken for a complete one;
    temp dirs left by a killed build are removed.
    """
    data_dir = Path(data_dir)
    model_dir, adapter_root = data_dir / "model", data_dir / "adapters"
    if _intact(data_dir):
        return model_dir, adapter_root

    data_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(data_dir)
    (data_dir / MARKER).unlink(missing_ok=True)
    log.info("building the embedded default model and demo adapters under %s", data_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".embedded-{os.getpid()}-", dir=data_dir))
    try:
        save_tiny_llama(tmp / "model")
        shapes = linear_shapes(tmp / "model")
        for i, spec in enumerate(DEMO_ADAPTERS):
            write_peft_adapter(
                tmp / "adapters" / spec.name,
                shapes,
                spec,
                base_model=str(model_dir),
                seed=SEED + 1 + i,
            )
        # Replace only what we built: other adapters under adapter_root are the user's.
        adapter_root.mkdir(exist_ok=True)
        moves = [(tmp / "model", model_dir)]
        moves += [(tmp / "adapters" / s.name, adapter_root / s.name) for s in DEMO_ADAPTERS]
        for src, target in moves:
            if target.exists():
                shutil.rmtree(target)
            os.replace(src, target)
        marker = {"version": _MARKER_VERSION, "files": _built_files(data_dir)}
        partial = data_dir / f"{MARKER}.{os.getpid()}"
        partial.write_text(json.dumps(marker, indent=1) + "\n")
        os.replace(partial, data_dir / MARKER)  # the marker appears whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir, adapter_root
