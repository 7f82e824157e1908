"""The engine's configuration: every engine limit and default, written once.

The server's config embeds one (``ServerConfig.engine``); the runner is built for it (buffer,
graph and KV sizes) and the engine schedules within it. ``None`` fields are derived from the
model when it loads (``max_total_tokens``: its context length; ``max_input_tokens``: one less).
"""

from __future__ import annotations

from dataclasses import dataclass

# The context length of a model whose config does not say.
FALLBACK_CONTEXT_TOKENS = 4096
# The LoRA kernels' widest rank.
KERNEL_MAX_LORA_RANK = 128
# The base-weight formats of --quantize (hotmerge_kernels.quant.FORMATS; a test keeps them equal).
QUANT_FORMATS = ("nf4", "int4", "int8", "fp8")


@dataclass
class EngineConfig:
    max_batch_size: int = 8  # rows decoded at once (graphs are captured up to this size)
    max_input_tokens: int | None = None  # None: max_total_tokens - 1
    max_total_tokens: int | None = None  # prompt + generated; None: the model's context length
    max_prefill_tokens: int = 2048  # prompt tokens one step prefills (longer prompts: chunks)
    # After a first request reaches an idle engine, wait up to this for more: for those the
    # request path has received and not yet queued (Engine.arriving), or for any if not counted.
    batch_wait_ms: float = 2.0
    block_size: int = 16  # tokens per KV block
    kv_cache_fraction: float = 0.9  # of device memory free after weights and the LoRA budgets
    kv_cache_tokens: int | None = None  # an exact KV capacity instead (CPU default: a full batch)
    reserved_bytes: int = 0  # device memory kept for adapters and merges (the server's budgets)
    max_loras: int = 16  # adapter slots on the device (distinct adapters running at once)
    max_lora_rank: int = 64  # widest adapter a slot holds (merged cat adapters add ranks up)
    prefix_caching: bool = True  # reuse the KV blocks of a prompt prefix already computed
    mixed_steps: bool = True  # decode rows and prompt chunks in one forward (prefill's path)
    # Launch each step before the one in flight has brought its tokens to the host (worker.py).
    plan_ahead: bool = True
    cuda_graphs: bool = True  # decode and prefill replayed from captured graphs (CUDA only)
    eager_model: bool = False  # run the model through transformers' forward (any architecture)
    # Quantize the base's projections at load: nf4 (bitsandbytes' NF4), int4, int8, fp8; None: off.
    quantize: str | None = None

    def __post_init__(self) -> None:
        positive = {
            "max_batch_size": self.max_batch_size,
            "max_input_tokens": self.max_input_tokens,
            "max_total_tokens": self.max_total_tokens,
            "max_prefill_tokens": self.max_prefill_tokens,
            "kv_cache_tokens": self.kv_cache_tokens,
            "block_size": self.block_size,
            "max_loras": self.max_loras,
            "max_lora_rank": self.max_lora_rank,
        }
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.max_lora_rank > KERNEL_MAX_LORA_RANK:
            raise ValueError(
                f"max_lora_rank must be <= {KERNEL_MAX_LORA_RANK} (the LoRA kernels' widest), "
                f"got {self.max_lora_rank}"
            )
        if self.quantize is not None and self.quantize not in QUANT_FORMATS:
            raise ValueError(f"quantize must be one of {QUANT_FORMATS}, got {self.quantize!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
