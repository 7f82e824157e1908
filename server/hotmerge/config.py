"""How one server process is set up: model, adapters, limits, network. Built by the CLI or tests."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 50051
DEFAULT_HTTP_PORT = 8080
DATA_DIR_ENV = "HOTMERGE_DATA_DIR"


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "data"))


@dataclass
class ServerConfig:
    # None: the embedded default (SmolLM2-135M-Instruct and its skill adapters, set up under
    # data_dir; $HOTMERGE_EMBEDDED=tiny: a tiny random Llama). A .gguf is converted once.
    model: str | None = None
    data_dir: Path = field(default_factory=_default_data_dir)
    # Where adapters live, one PEFT folder per adapter id. None: data_dir/adapters.
    adapter_root: Path | None = None
    allow_hub: bool = False  # let model and adapter ids fall through to the Hugging Face hub
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: the model runner's choice for the device

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT  # 0: any free port (RunningServer.port says which)
    # Each in-flight RPC holds one thread (streams for their whole length), so this bounds the
    # number of concurrent requests; further ones wait in the executor's queue.
    max_workers: int = 64
    grace_s: float = 10.0  # on shutdown, how long in-flight requests may finish
    # Connections: keepalive pings find dead peers; a maximum age closes (GOAWAY) long-lived
    # client connections so they reconnect and rebalance when replicas come and go.
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    max_connection_age_s: float | None = 300.0  # None: connections live forever
    max_connection_age_grace_s: float = 30.0  # for calls in flight on an aged connection
    # A client connection with no call for this long is closed (GOAWAY), so idle clients do
    # not hold server resources; None: never.
    max_connection_idle_s: float | None = 300.0

    max_batch_size: int = 8
    max_input_tokens: int | None = None  # None: the engine derives it from the model
    max_total_tokens: int | None = None
    default_max_new_tokens: int = 64
    # Device memory that resident adapters may take; least recently used ones are evicted.
    adapter_budget_bytes: int = 2 * 1024**3
    # Device memory for cached merged adapters (a merged adapter is the size of one input; a
    # merge needs its inputs resident in the store too, so the store gets the larger part).
    merge_budget_bytes: int = 1024**3
    max_merge_adapters: int = 16  # adapters in one merge spec
    # The longest a request waits for adapter or merge-cache room, or for another request's
    # load or merge of the same thing, when its own deadline is later (or unset).
    max_wait_s: float = 30.0
    batch_wait_ms: float = 2.0
    # The engine (see hotmerge.engine): KV cache, adapter slots, prefill chunks, CUDA graphs.
    kv_cache_fraction: float = 0.9  # of device memory free after weights and the LoRA budgets
    kv_cache_tokens: int | None = None  # an exact KV capacity instead (CPU default: a full batch)
    block_size: int = 16  # tokens per KV block
    max_loras: int = 16  # adapter slots on the device (distinct adapters running at once)
    max_lora_rank: int = 64  # widest adapter a slot holds (merged cat adapters add ranks up)
    max_prefill_tokens: int = 2048  # prompt tokens one step prefills (longer prompts: chunks)
    cuda_graphs: bool = True  # decode replayed from captured graphs (CUDA only)
    eager_model: bool = False  # run the model through transformers' forward (any architecture)
    # The HTTP server (LoRAX REST, OpenAI, /metrics, /healthz, /readyz) on ``host``; None: off,
    # 0: any free port (RunningServer.http_port says which).
    http_port: int | None = DEFAULT_HTTP_PORT
    # A keep-alive HTTP connection idle this long is closed; beyond ``http_max_connections``
    # concurrent connections (and requests) new ones are answered 503.
    http_keep_alive_s: float = 5.0
    http_max_connections: int = 1024
    # Named merges to register at start: a JSON file {"name": {merge spec fields}}.
    merges_file: Path | None = None

    log_level: str = "INFO"

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.adapter_root is not None:
            self.adapter_root = Path(self.adapter_root)
        if self.merges_file is not None:
            self.merges_file = Path(self.merges_file)
        if not isinstance(logging.getLevelName(self.log_level.upper()), int):
            raise ValueError(
                f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}"
            )
        for name in ("port", "http_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {port}")
        positive = {
            "keepalive_time_s": self.keepalive_time_s,
            "keepalive_timeout_s": self.keepalive_timeout_s,
            "max_connection_age_s": self.max_connection_age_s,
            "max_connection_idle_s": self.max_connection_idle_s,
            "http_keep_alive_s": self.http_keep_alive_s,
            "http_max_connections": self.http_max_connections,
            "max_workers": self.max_workers,
            "max_batch_size": self.max_batch_size,
            "default_max_new_tokens": self.default_max_new_tokens,
            "adapter_budget_bytes": self.adapter_budget_bytes,
            "merge_budget_bytes": self.merge_budget_bytes,
            "max_merge_adapters": self.max_merge_adapters,
            "max_wait_s": self.max_wait_s,
            "max_input_tokens": self.max_input_tokens,
            "max_total_tokens": self.max_total_tokens,
            "kv_cache_tokens": self.kv_cache_tokens,
            "block_size": self.block_size,
            "max_loras": self.max_loras,
            "max_lora_rank": self.max_lora_rank,
            "max_prefill_tokens": self.max_prefill_tokens,
        }
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.max_lora_rank > 128:
            raise ValueError(
                f"max_lora_rank must be <= 128 (the LoRA kernels' widest), got {self.max_lora_rank}"
            )
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")

    def grpc_options(self) -> list[tuple[str, int]]:
        """grpc.Server channel args: keepalive, connection age and idle timeout."""
        options = [
            # Without this, Linux lets a second server bind the same port and steal half the calls.
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", _ms(self.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", _ms(self.keepalive_timeout_s)),
            # Accept clients' (and balancers') keepalive pings as often as ours.
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(self.keepalive_time_s)),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        if self.max_connection_age_s is not None:
            options += [
                ("grpc.max_connection_age_ms", _ms(self.max_connection_age_s)),
                ("grpc.max_connection_age_grace_ms", _ms(self.max_connection_age_grace_s)),
            ]
        if self.max_connection_idle_s is not None:
            options.append(("grpc.max_connection_idle_ms", _ms(self.max_connection_idle_s)))
        return options

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
