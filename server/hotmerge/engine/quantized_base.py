"""The load-time side of quantized bases (the formats and kernels are ``hotmerge_kernels.quant``):
loading checkpoints transformers saved with bitsandbytes as they are stored, refusing other
quantized checkpoints, and the start-up log of what quantization gave.

Two bitsandbytes layouts load, without bitsandbytes, into the formats the kernels read:

- 4-bit NF4 (``load_in_4bit``, ``bnb_4bit_quant_type="nf4"``: QLoRA's base). Per quantized
  projection ``X`` (``Linear4bit``'s state dict, its ``QuantState`` packed for safetensors):
  ``X.weight`` (N·K/2, 1) uint8, W flattened row-major, two codes a byte, the even element in
  the high nibble; ``X.weight.absmax`` one float32 per 64-block, or with double quantization
  its uint8 codes, with ``X.weight.nested_absmax`` (float32 per 256) and
  ``X.weight.nested_quant_map`` (the 256-value dynamic code); ``X.weight.quant_map`` NF4's 16
  values; ``X.weight.quant_state.bitsandbytes__nf4`` the rest as JSON bytes (``quant_type``,
  ``blocksize``, ``dtype``, ``shape``, ``nested_blocksize``, ``nested_offset``). That is
  :class:`~hotmerge_kernels.quant.Nf4Weight` field for field: served bit for bit.
- 8-bit (``load_in_8bit``, LLM.int8's weights). Per projection (``Linear8bitLt``'s state dict):
  ``X.weight`` (N, K) int8, ``X.SCB`` each row's absmax (float32), ``X.weight_format`` (0: row
  major). bitsandbytes dequantizes ``q · SCB · (1/127)``; an :class:`Int8Weight` with scale
  ``SCB · (1/127)`` is that to float32 rounding (its outlier columns in 16-bit activations
  are a matmul scheme, not stored weights: the weights served are the stored ones).

The rest of the model (embeddings, norms, lm_head, which bitsandbytes leaves 16-bit) loads as
usual, into a model built on the meta device, so no 16-bit projection is ever allocated.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from hotmerge_kernels.quant import Int8Weight, Nf4Weight
from hotmerge_kernels.quant.formats import NF4_BLOCK, NF4_STATS_BLOCK, dynamic_code, nf4_code

from hotmerge.engine.config import EngineConfig
from hotmerge.errors import InvalidArgument

log = logging.getLogger("hotmerge.engine.runner")

QUANT_STATE = "weight.quant_state.bitsandbytes__nf4"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def saved_format(model_id: str, local: bool) -> str | None:
    """None for a 16-bit checkpoint; "nf4" or "int8" for one bitsandbytes saved in 4-bit NF4
    or 8-bit; InvalidArgument for any other quantized checkpoint (bitsandbytes FP4, GPTQ,
    AWQ...), with the way out."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_id, local_files_only=local)
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    method = quant.get("quant_method")
    kind = method
    if method == "bitsandbytes" and quant.get("load_in_8bit"):
        return "int8"
    if method == "bitsandbytes" and quant.get("load_in_4bit"):
        kind = f"{method}, {quant.get('bnb_4bit_quant_type', 'fp4')}"
        if quant.get("bnb_4bit_quant_type", "fp4") == "nf4":
            return "nf4"
    raise InvalidArgument(
        f"model {model_id!r}: checkpoints saved quantized ({kind}) are not supported (of those "
        "saved quantized, bitsandbytes 4-bit NF4 and 8-bit are); serve its 16-bit base with "
        "--quantize nf4 (bitsandbytes' NF4, bit for bit), int4, int8 or fp8"
    )


def load_bnb(path: Path, fmt: str, dtype: torch.dtype, device: torch.device):
    """The transformers model of a bitsandbytes checkpoint (``path``: its directory; ``fmt``:
    "nf4" or "int8", from ``saved_format``), on ``device``: 16-bit tensors loaded into it, each
    quantized projection's weight gone and its quantized weight attached as ``stored_weight``
    (what ``LlamaLayer`` takes)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise InvalidArgument(f"model {str(path)!r}: no .safetensors files beside its config")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    del config.quantization_config
    with torch.device("meta"):  # no memory, no init: every tensor comes from the checkpoint
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    modules = dict(model.named_modules())
    marker, read = _READERS[fmt]
    names = [k[: -len(marker) - 1] for k in tensors if k.endswith(f".{marker}")]
    if not names:
        raise InvalidArgument(
            f"model {str(path)!r}: its config says bitsandbytes {fmt}, but it holds no {fmt} "
            f"weights (no *.{marker}); fix its quantization_config"
        )
    for name in names:
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear) or name.rsplit(".", 1)[-1] not in PROJECTIONS:
            raise InvalidArgument(
                f"model {str(path)!r}: {name} is saved in {fmt}; only the projections "
                f"{', '.join(PROJECTIONS)} can be (save the others, lm_head among them, 16-bit)"
            )
        module.weight = None
        shape = (module.out_features, module.in_features)
        module.stored_weight = read(name, tensors, shape, dtype).to(device)
    model.to_empty(device=device)
    missing, unexpected = model.load_state_dict(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
        strict=False,
    )
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise InvalidArgument(
            f"model {str(path)!r}: the checkpoint does not match its config (missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.tie_weights()
    if (Path(path) / "generation_config.json").exists():  # its EOS ids, as from_pretrained reads
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    # Buffers built at init, not saved (RoPE's inverse frequencies): built again on the device.
    rope = model.model.rotary_emb
    model.model.rotary_emb = type(rope)(model.config).to(device)
    return model


def _nf4_weight(name: str, tensors: dict, shape: tuple[int, int], dtype) -> Nf4Weight:
    """One projection's NF4 weight from its checkpoint tensors (popped from ``tensors``)."""
    prefix = f"{name}.weight"
    state = json.loads(bytes(tensors.pop(f"{name}.{QUANT_STATE}").tolist()))
    n, k = shape
    problems = []
    if state.get("quant_type") != "nf4":
        problems.append(f"quant_type {state.get('quant_type')!r}")
    if state.get("blocksize") != NF4_BLOCK:
        problems.append(f"blocksize {state.get('blocksize')} (only {NF4_BLOCK})")
    if tuple(state.get("shape", ())) != (n, k):
        problems.append(f"shape {state.get('shape')} for a {n}x{k} projection")
    if k % NF4_BLOCK:
        problems.append(f"in_features {k} is not a multiple of {NF4_BLOCK}")
    code = tensors.pop(f"{prefix}.quant_map").float()
    if code.shape != (16,) or not torch.equal(code, nf4_code("cpu")):
        problems.append("a quant_map that is not NF4's code book")
    nested = f"{prefix}.nested_absmax" in tensors
    if nested and state.get("nested_blocksize") != NF4_STATS_BLOCK:
        problems.append(f"nested_blocksize {state.get('nested_blocksize')}")
    if nested:
        code2 = tensors.pop(f"{prefix}.nested_quant_map").float()
        if not torch.equal(code2, dynamic_code("cpu")):
            problems.append("a nested_quant_map that is not the dynamic code")
    if problems:
        raise InvalidArgument(f"{name}: NF4 weight not loadable: {'; '.join(problems)}")
    packed = tensors.pop(prefix).view(torch.uint8).reshape(n, k // 2)
    absmax = tensors.pop(f"{prefix}.absmax")
    dtype = getattr(torch, state.get("dtype", ""), dtype)
    if not nested:
        return Nf4Weight((n, k), dtype, packed=packed, absmax=absmax.float())
    return Nf4Weight(
        (n, k),
        dtype,
        packed=packed,
        absmax=None,
        qabsmax=absmax.view(torch.uint8),
        absmax2=tensors.pop(f"{prefix}.nested_absmax").float(),
        code2=code2,
        offset=torch.tensor(float(state["nested_offset"]), dtype=torch.float32),
    )


def _int8_weight(name: str, tensors: dict, shape: tuple[int, int], dtype) -> Int8Weight:
    """One projection's 8-bit weight from its checkpoint tensors (popped from ``tensors``)."""
    q, scb = tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.SCB")
    layout = tensors.pop(f"{name}.weight_format", None)
    problems = []
    if q.dtype != torch.int8 or tuple(q.shape) != shape:
        problems.append(f"weight {q.dtype} {tuple(q.shape)} for a {shape[0]}x{shape[1]} int8")
    if tuple(scb.shape) != (shape[0],):
        problems.append(f"SCB of shape {tuple(scb.shape)}")
    if layout is not None and int(layout) != 0:
        problems.append(f"weight_format {int(layout)} (only 0: row major)")
    if problems:
        raise InvalidArgument(f"{name}: 8-bit weight not loadable: {'; '.join(problems)}")
    scale = scb.float() * torch.tensor(1 / 127, dtype=torch.float32)  # bitsandbytes' reciprocal
    return Int8Weight(shape, dtype, qweight=q, scale=scale)


# Per format: the key suffix that marks a quantized projection, and its reader.
_READERS = {"nf4": (QUANT_STATE, _nf4_weight), "int8": ("SCB", _int8_weight)}


def log_quantized(model, config: EngineConfig, per_block: int, device: torch.device) -> None:
    """Format, the projections' bytes before and after, and the KV tokens the bytes saved buy
    (the KV cache is sized from the free memory after the weights, on CUDA)."""
    before, after = model.base_bytes_16bit, model.base_bytes
    saved = before - after
    sized_by_memory = device.type == "cuda" and config.kv_cache_tokens is None
    gained = int(saved * config.kv_cache_fraction // per_block) * config.block_size
    log.info(
        "base quantized to %s: projections %.2f GiB -> %.2f GiB (%.2f GiB saved); KV cache %s",
        config.quantize,
        before / 2**30,
        after / 2**30,
        saved / 2**30,
        f"+{gained} tokens from it" if sized_by_memory else "not sized by free memory here",
    )
