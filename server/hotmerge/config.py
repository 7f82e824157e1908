"""How one server process is set up: model, adapters, limits, network. Built by the CLI or tests."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from hotmerge import settings
from hotmerge.engine.config import EngineConfig

DEFAULT_PORT = 50051
DEFAULT_HTTP_PORT = 8080


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


@dataclass
class ServerConfig:
    # None: the embedded default (SmolLM2-135M-Instruct and its skill adapters, set up under
    # data_dir; $HOTMERGE_EMBEDDED=tiny: a tiny random Llama). A .gguf is converted once.
    model: str | None = None
    data_dir: Path = field(default_factory=settings.data_dir)
    # Where adapters live, one PEFT folder per adapter id. None: data_dir/adapters.
    adapter_root: Path | None = None
    allow_hub: bool = False  # let model and adapter ids fall through to the Hugging Face hub
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: the model runner's choice for the device

    # Loopback by default: pass host="0.0.0.0" (--host 0.0.0.0) to serve other machines.
    host: str = "127.0.0.1"
    # With a key, every call but health, reflection and /metrics must carry it
    # (HTTP "Authorization: Bearer KEY", gRPC metadata "authorization: Bearer KEY").
    api_key: str | None = None
    port: int = DEFAULT_PORT  # 0: any free port (RunningServer.port says which)
    # Threads for the gRPC RPCs' blocking work (merges, adapter loads, listings): the RPCs
    # themselves are coroutines on one event loop and hold none while they stream.
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
    # The engine (see hotmerge.engine): batch and token limits, KV cache, adapter slots,
    # prefill chunks, CUDA graphs. ``reserved_bytes`` is set from the two budgets above.
    engine: EngineConfig = field(default_factory=EngineConfig)
    # The HTTP server (LoRAX REST, OpenAI, /metrics, /healthz, /readyz) on ``host``; None: off,
    # 0: any free port (RunningServer.http_port says which).
    http_port: int | None = DEFAULT_HTTP_PORT
    # A keep-alive HTTP connection idle this long is closed; beyond ``http_max_connections``
    # concurrent connections (and requests) new ones are answered 503.
    http_keep_alive_s: float = 5.0
    http_max_connections: int = 1024
    # Named merges to register at start: a JSON file {"name": {merge spec fields}}.
    merges_file: Path | None = None
    max_named_merges: int = 1024  # names registered at once (Merge with a name, POST /merges)
    # HTTP request bodies larger than this are refused (413) before they are read whole.
    http_max_body_bytes: int = 4 * 1024**2

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
            "default_max_new_tokens": self.default_max_new_tokens,
            "adapter_budget_bytes": self.adapter_budget_bytes,
            "merge_budget_bytes": self.merge_budget_bytes,
            "max_merge_adapters": self.max_merge_adapters,
            "max_named_merges": self.max_named_merges,
            "http_max_body_bytes": self.http_max_body_bytes,
            "max_wait_s": self.max_wait_s,
        }
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.api_key is not None and (
            not self.api_key or not self.api_key.isascii() or not self.api_key.isprintable()
        ):
            raise ValueError("api_key must be non-empty printable ASCII")

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
