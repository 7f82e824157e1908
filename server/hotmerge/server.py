"""Server assembly: the Hotmerge servicer, gRPC health and reflection on one grpc.aio server.

The port opens first with health NOT_SERVING (so probes and clients get an answer while a big
model loads), then the model, adapter store and engine are built, then health turns SERVING.
``start_server`` returns a RunningServer for tests and embedding; ``serve`` blocks until
SIGINT/SIGTERM, then drains (``lifecycle.py``): health NOT_SERVING and /readyz 503, new Hotmerge
RPCs refused with UNAVAILABLE, in-flight ones get ``grace_s`` to finish; then it stops, and the
process exits 0. With ``http_port`` set (the default), the HTTP fronts (LoRAX REST, OpenAI) and
/healthz, /readyz, /metrics are served on that port by the same process (``api/http_app.py``);
both fronts call one ``RequestPath``. gRPC server reflection is served as v1 and v1alpha.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import signal
import threading
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from hotmerge.adapters.store import AdapterStore
from hotmerge.api.auth import ApiKeyInterceptor
from hotmerge.api.core import RequestPath
from hotmerge.api.grpc_server import GrpcServer, LoopHealth, LoopThread
from hotmerge.api.grpc_service import HotmergeService
from hotmerge.api.grpc_wire import DecodeErrorInterceptor
from hotmerge.api.http_app import HttpServer, create_app
from hotmerge.config import ServerConfig
from hotmerge.engine import Engine, load_runner
from hotmerge.lifecycle import Lifecycle
from hotmerge.merging.cache import MergeCache
from hotmerge.merging.merger import Merger
from hotmerge.merging.named import NamedMerges
from hotmerge.merging.warm_up import warm_merge_kernels
from hotmerge.metrics import Metrics
from hotmerge.v1 import hotmerge_pb2, hotmerge_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = hotmerge_pb2.DESCRIPTOR.services_by_name["Hotmerge"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


@dataclass
class RunningServer:
    server: GrpcServer
    port: int
    service: HotmergeService
    health: LoopHealth
    config: ServerConfig
    metrics: Metrics
    lifecycle: Lifecycle
    http: HttpServer | None = None  # the HTTP fronts, /metrics, /healthz, /readyz

    @property
    def http_port(self) -> int | None:
        """Where the HTTP server listens; None when off."""
        return None if self.http is None else self.http.port

    @property
    def http_url(self) -> str | None:
        if self.http is None:
            return None
        return f"http://{self.target.rsplit(':', 1)[0]}:{self.http.port}"

    @property
    def path(self) -> RequestPath:
        return self.service.path

    @property
    def engine(self) -> Engine | None:
        return self.service.engine

    @property
    def target(self) -> str:
        """Where a client on this machine reaches it."""
        host = self.config.host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def store(self) -> AdapterStore | None:
        return self.service.path.store

    def set_serving(self, engine: Engine, store: AdapterStore) -> None:
        named = build_named_merges(store, self.config)
        merger = build_merger(engine, store, self.config, self.metrics)
        self.service.attach(engine, store, merger, named)
        watch_engine(self.metrics, engine, store)
        self.lifecycle.set_serving()

    def stop(self, grace: float | None = None) -> bool:
        """Drain: refuse new RPCs (UNAVAILABLE), give in-flight ones ``grace`` seconds, then stop
        the server and the engine. True if every in-flight RPC finished within the grace."""
        drained = self.lifecycle.drain(grace or 0.0)
        if self.service.merger is not None:  # merges still running stop at their next chunk
            self.service.merger.stop()
        # A handler that has returned may still be sending its status: a second for that, when
        # all finished; otherwise cancel whatever is still in flight now.
        self.server.stop(1.0 if drained and grace else 0).wait()
        if self.engine is not None:
            self.engine.stop(timeout=10)
        if self.http is not None:
            self.http.stop()
        self.lifecycle.stopped()
        return drained

    def wait(self) -> None:
        self.server.wait_for_termination()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop(0)


def build_engine(config: ServerConfig) -> tuple[Engine, AdapterStore]:
    """Load the model (the embedded default when config.model is None), build the adapter
    store for it and start the engine."""
    from hotmerge.embedded import ensure_embedded
    from hotmerge.engine.models.gguf import resolve_model

    model, adapter_root = config.model, config.adapter_root
    if model is None:
        model_dir, embedded_adapters = ensure_embedded(config.data_dir)
        model, adapter_root = str(model_dir), adapter_root or embedded_adapters
    else:  # a GGUF file (or a folder of one) is converted once, cached under the data dir
        model = resolve_model(model, config.data_dir / "models")
    adapter_root = adapter_root or config.data_dir / "adapters"
    engine_config = dataclasses.replace(
        config.engine, reserved_bytes=config.adapter_budget_bytes + config.merge_budget_bytes
    )
    runner = load_runner(
        model,
        device=config.device,
        dtype=config.dtype,
        allow_hub=config.allow_hub,
        config=engine_config,
    )
    store = AdapterStore(
        adapter_root,
        device=runner.device,
        dtype=runner.dtype,
        budget_bytes=config.adapter_budget_bytes,
        module_shapes=runner.module_shapes(),
        allow_hub=config.allow_hub,
        max_wait_s=config.max_wait_s,
        max_rank=config.engine.max_lora_rank,
    )
    warm_merge_kernels(runner.module_shapes(), runner.device, runner.dtype)
    engine = Engine(runner)
    engine.start()
    return engine, store


def build_merger(
    engine: Engine, store: AdapterStore, config: ServerConfig, metrics: Metrics
) -> Merger:
    cache = MergeCache(
        config.merge_budget_bytes,
        on_event=metrics.merge_cache_event,
        wait_for_room_s=config.max_wait_s,
    )
    metrics.merged_adapter_bytes.set_function(lambda: cache.used_bytes)
    dtype = str(engine.runner.dtype).removeprefix("torch.")
    return Merger(
        store, cache, dtype=dtype, metrics=metrics, max_rank=config.engine.max_lora_rank,
        check_adapter=engine.runner.adapters.check,
    )  # fmt: skip


def build_named_merges(store: AdapterStore, config: ServerConfig) -> NamedMerges:
    """The registry, with the merges of ``config.merges_file`` (a bad file stops the start)."""

    def is_adapter(name: str) -> bool:
        return store.is_loaded(name) or store.adapter_root.has_adapter_dir(name)

    named = NamedMerges(
        is_adapter, max_adapters=config.max_merge_adapters, max_names=config.max_named_merges
    )
    if config.merges_file is not None:
        names = named.load_file(config.merges_file)
        log.info("named merges from %s: %s", config.merges_file, ", ".join(names) or "none")
    return named


def watch_engine(metrics: Metrics, engine: Engine, store: AdapterStore) -> None:
    """Gauges read at scrape time from the engine and its adapter store."""
    metrics.queue_depth.set_function(lambda: engine.queue_depth)
    metrics.requests_running.set_function(lambda: engine.running_requests)
    metrics.kv_cache_usage.set_function(lambda: engine.kv_cache_usage)
    metrics.watch_prefix_cache(lambda: (engine.kv.queries, engine.kv.hits))
    metrics.watch_adapters(engine.adapter_names, max_lora=engine.max_batch_size)
    metrics.adapter_bytes.set_function(lambda: store.used_bytes)
    metrics.adapters_loaded.set_function(lambda: store.loaded_count)


def open_port(config: ServerConfig) -> RunningServer:
    """A started grpc.Server with every service registered; health NOT_SERVING, no engine yet."""
    metrics = Metrics()
    path = RequestPath(
        default_max_new_tokens=config.default_max_new_tokens,
        max_merge_adapters=config.max_merge_adapters,
        metrics=metrics,
    )
    service = HotmergeService(path=path)
    loop = LoopThread(config.max_workers)
    health_servicer = LoopHealth(loop)
    # "" is the whole server, as probes ask by default; NOT_SERVING until the model is loaded.
    lifecycle = Lifecycle(health_servicer, ("", SERVICE_NAME), guarded=SERVICE_NAME)
    server = GrpcServer(
        loop,
        # The decode check runs inside the drain check: a draining replica refuses first.
        # The key first: a caller without it learns nothing, not even that the replica drains.
        interceptors=[
            *([ApiKeyInterceptor(config.api_key)] if config.api_key else []),
            lifecycle.interceptor(),
            DecodeErrorInterceptor(),
        ],
        options=config.grpc_options(),
    )
    hotmerge_pb2_grpc.add_HotmergeServicer_to_server(service, server.server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer.servicer, server.server)
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
    reflection.enable_server_reflection(names, server.server)
    enable_reflection_v1(names, server.server)
    try:
        port = server.add_insecure_port(config.address)
    except RuntimeError as exc:  # grpc raises RuntimeError("Failed to bind ...")
        server.stop(0)
        raise OSError(f"cannot listen on {config.address}: {exc} (port in use?)") from None
    if port == 0:
        server.stop(0)
        raise OSError(f"cannot listen on {config.address} (port in use?)")
    server.start()
    running = RunningServer(server, port, service, health_servicer, config, metrics, lifecycle)
    if config.http_port is not None:
        try:
            running.http = HttpServer(
                create_app(
                    path,
                    lifecycle,
                    metrics,
                    api_key=config.api_key,
                    max_body_bytes=config.http_max_body_bytes,
                ),
                host=config.host,
                port=config.http_port,
                keep_alive_s=config.http_keep_alive_s,
                max_connections=config.http_max_connections,
            )
        except BaseException:
            server.stop(0)
            raise
        log.info(
            "HTTP (LoRAX REST, OpenAI, /metrics, /readyz) on http://%s:%d",
            config.host,
            running.http_port,
        )
    return running


def enable_reflection_v1(service_names, server: grpc.aio.Server) -> None:
    """Serve reflection as ``grpc.reflection.v1`` too (grpcio-reflection ships v1alpha only).

    The two protocols have the same messages, field for field, so v1alpha's servicer answers
    v1 requests as they are.
    """
    servicer = reflection.aio.ReflectionServicer(service_names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


def start_server(config: ServerConfig) -> RunningServer:
    """Open the port, load the model, turn SERVING; return once requests can be served."""
    running = open_port(config)
    log.info("listening on %s:%d; loading the model", config.host, running.port)
    try:
        running.set_serving(*build_engine(config))
    except BaseException:
        running.stop(0)
        raise
    return running


def freeze_startup_objects() -> None:
    """Move everything alive (the model, graphs, adapters: loaded for good) out of the garbage
    collector's sight, so a full collection while serving does not walk them all, a pause every
    running row would wait on. For a process that serves from here on (not tests, which start
    many servers: frozen cycles are never freed)."""
    gc.collect()
    gc.freeze()


def serve(config: ServerConfig) -> None:
    """Run the server until SIGINT or SIGTERM, then drain and stop.

    The signal handlers go in first, so a signal while the model loads drains right after it.
    """
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    running = start_server(config)
    freeze_startup_objects()
    engine = running.engine
    runner = engine.runner
    log.info(
        "serving %s on %s:%d (%s, %s, %s forward; max batch %d, max input %d, max total %d "
        "tokens; KV cache %d tokens); adapters from %s",
        runner.model_id,
        config.host,
        running.port,
        runner.device,
        str(runner.dtype).removeprefix("torch."),
        runner.kind,
        engine.max_batch_size,
        engine.max_input_tokens,
        engine.max_total_tokens,
        engine.kv_capacity_tokens,
        running.store.adapter_root.path,
    )
    # A timed wait: Python runs signal handlers only in the main thread, and a signal the
    # kernel hands to another thread does not wake an untimed wait.
    while not stop.wait(0.5):
        pass
    in_flight = running.lifecycle.in_flight
    log.info(
        "draining: health NOT_SERVING, new requests refused; %d in flight have %.0f s to finish",
        in_flight,
        config.grace_s,
    )
    started = time.monotonic()
    drained = running.stop(config.grace_s)
    log.info(
        "stopped: drained in %.2f s (%s)",
        time.monotonic() - started,
        "all in-flight requests finished" if drained else "grace period over, the rest cancelled",
    )
