"""Loading a model: the tokenizer and transformers model, then the runner for it.

Llama-family models run through our own forward (:class:`~hotmerge.engine.runner.LlamaRunner`),
any other architecture (or ``EngineConfig.eager_model``) through transformers, eagerly
(:class:`~hotmerge.engine.models.hf_eager.EagerRunner`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from hotmerge.engine.config import EngineConfig
from hotmerge.engine.models.hf_eager import EagerRunner
from hotmerge.engine.models.llama import unsupported_reason
from hotmerge.engine.quantized_base import load_bnb, saved_format
from hotmerge.engine.runner import LlamaRunner, ModelRunner, Tokenizer
from hotmerge.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise InvalidArgument(
            f"dtype: unknown {dtype!r}; use one of float32, float16, bfloat16"
        ) from None


def load_runner(
    model_id_or_path: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    allow_hub: bool = False,
    config: EngineConfig | None = None,
) -> ModelRunner:
    """Load tokenizer and model; our forward for Llama-family models, transformers otherwise
    (or when ``config.eager_model``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = config or EngineConfig()
    model_id = str(model_id_or_path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    local = Path(model_id).is_dir()
    if not local and not allow_hub:
        raise NotFound(
            f"model {model_id!r}: no such directory (hub downloads are off; "
            "enable them to fetch from the Hugging Face Hub)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=local)
    except (OSError, ValueError, TypeError, KeyError) as exc:  # transformers' many ways
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArgument(
            f"model {model_id!r}: no usable tokenizer ({reason[:200]}); save the "
            "tokenizer with the model (tokenizer.json, tokenizer_config.json)"
        ) from None
    saved = saved_format(model_id, local)  # bitsandbytes nf4 / int8: loaded as stored
    if saved is not None:
        if config.quantize not in (None, saved):
            raise InvalidArgument(
                f"model {model_id!r} is saved in bitsandbytes' {saved}: --quantize "
                f"{config.quantize} would quantize it twice; leave --quantize unset (or "
                f"{saved}), or serve its 16-bit base"
            )
        if not local:
            raise InvalidArgument(
                f"model {model_id!r}: a checkpoint saved quantized loads from a local directory; "
                "download it first (huggingface-cli download)"
            )
        model = load_bnb(Path(model_id), saved, torch_dtype, dev)
        config = dataclasses.replace(config, quantize=saved)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_id, dtype=torch_dtype, local_files_only=local
        ).to(dev)
    return build_runner(model_id, model, tokenizer, config)


def build_runner(model_id: str, model, tokenizer, config: EngineConfig) -> ModelRunner:
    """A runner over an already loaded transformers model (on its device and dtype)."""
    model = model.eval().requires_grad_(False)
    tok = Tokenizer(tokenizer, _eos_ids(model, tokenizer))
    reason = "the eager path was asked for" if config.eager_model else unsupported_reason(model)
    if reason is None:
        return LlamaRunner(model_id, model, tok, config)
    if config.quantize is not None:
        raise InvalidArgument(f"quantize: needs hotmerge's Llama-family forward, but {reason}")
    log.warning("model %s runs through transformers, eagerly: %s", model_id, reason)
    return EagerRunner(model_id, model, tok, config)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen_config = getattr(model, "generation_config", None)
    for source in (getattr(gen_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(source)
    return ids
