"""The gRPC server: ``grpc.aio`` on an event loop of its own thread, driven from synchronous code.

One event loop serves every RPC: a streamed token costs it one wake-up and a write, where the
thread-per-RPC server (``grpc.server``) took a thread hand-over and several GIL hand-overs, about
100 µs of CPU against 45 (``benchmarks/results/grpc-stream-cost-cpu-2026-12-07.md``), time the
engine thread waits for the GIL at high concurrency. What may block runs on the loop's thread
pool (``max_workers`` threads; ``api/grpc_service.py``).

``LoopThread`` runs the loop; ``GrpcServer`` has the calls the rest of the server makes of a
``grpc.Server`` (ports, start, stop, wait), each run on the loop; ``LoopHealth`` is
``grpc.health.v1`` (its asyncio servicer) set from any thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health

T = TypeVar("T")


class LoopThread:
    """An event loop running on a thread of its own, with ``max_workers`` threads for what may
    block; ``run`` hands it a coroutine from any other thread and waits for the result."""

    def __init__(self, max_workers: int) -> None:
        self.loop = asyncio.new_event_loop()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hotmerge-rpc")
        self.loop.set_default_executor(self._pool)
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="hotmerge-grpc", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop (what still runs on it is dropped) and its pool."""
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)


class GrpcServer:
    def __init__(
        self,
        loop: LoopThread,
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor],
        options: Sequence[tuple[str, Any]],
    ) -> None:
        self._loop = loop

        async def make() -> grpc.aio.Server:  # the server binds to the loop it is made on
            return grpc.aio.server(interceptors=list(interceptors), options=list(options))

        self.server = loop.run(make())
        self._stopped = threading.Event()

    def add_insecure_port(self, address: str) -> int:
        return self.server.add_insecure_port(address)

    def start(self) -> None:
        self._loop.run(self.server.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving: RPCs still running get ``grace`` seconds, then are cancelled; the
        loop and its pool end with it. The event is set once all has stopped."""
        if not self._stopped.is_set():
            self._loop.run(self.server.stop(grace))
            self._loop.close()
            self._stopped.set()
        return self._stopped

    def wait_for_termination(self) -> None:
        self._stopped.wait()


class LoopHealth:
    """``grpc.health.v1`` on the server's loop (its asyncio servicer), set from other threads."""

    def __init__(self, loop: LoopThread) -> None:
        self.servicer = health.aio.HealthServicer()
        self._loop = loop

    def set(self, name: str, status) -> None:
        self._loop.run(self.servicer.set(name, status), timeout=10)

    def enter_graceful_shutdown(self) -> None:
        self._loop.run(self.servicer.enter_graceful_shutdown(), timeout=10)
