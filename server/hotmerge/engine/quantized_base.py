"""The load-time side of ``--quantize`` (the formats and kernels are ``hotmerge_kernels.quant``):
refusing checkpoints saved quantized, and the start-up log of what quantization gave."""

from __future__ import annotations

import logging

import torch

from hotmerge.engine.config import EngineConfig
from hotmerge.errors import InvalidArgument

log = logging.getLogger("hotmerge.engine.runner")


def refuse_prequantized(model_id: str, local: bool) -> None:
    """Checkpoints saved quantized (bitsandbytes, GPTQ, AWQ...) are not loaded: serve the 16-bit
    base with ``--quantize`` instead (nf4 gives bitsandbytes' NF4 bit for bit, so a QLoRA
    adapter meets the base it was trained on)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_id, local_files_only=local)
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant.quant_method
        raise InvalidArgument(
            f"model {model_id!r}: checkpoints saved quantized ({method}) are not supported; "
            "serve its 16-bit base with --quantize nf4 (bitsandbytes' NF4, bit for bit), "
            "int4, int8 or fp8"
        )


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
