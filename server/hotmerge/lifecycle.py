"""A replica's lifecycle: loading -> serving -> draining -> stopped, and what each state answers.

``Lifecycle`` owns the state and mirrors it into gRPC health (``grpc.health.v1``: NOT_SERVING
while loading and draining, SERVING when ready) and into ``ready`` (HTTP ``/readyz``).

The HTTP app counts its generation requests with ``enter``/``exit`` the same way.
``Lifecycle.interceptor()`` is a server interceptor that counts in-flight RPCs of the Hotmerge
service and, once draining, refuses new ones with UNAVAILABLE (health and reflection stay open),
so a balancer or the client's retry policy sends them to another replica. ``drain(grace_s)``
waits for the in-flight ones to finish, up to the grace period.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2

from hotmerge.api.grpc_wire import wrap_handler

if TYPE_CHECKING:
    from hotmerge.api.grpc_server import LoopHealth

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class State(enum.Enum):
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class Lifecycle:
    def __init__(
        self, health_servicer: LoopHealth, service_names: Iterable[str], guarded: str
    ) -> None:
        """``service_names``: the health names to report ("" is the whole server);
        ``guarded``: the gRPC service (full name) whose RPCs drain and are counted."""
        self.health = health_servicer
        self.service_names = tuple(service_names)
        self.guarded_prefix = f"/{guarded}/"
        self.state = State.LOADING
        self._in_flight = 0
        self._idle = threading.Condition()
        self._report(_NOT_SERVING)

    @property
    def ready(self) -> bool:
        return self.state is State.SERVING

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _report(self, status) -> None:
        for name in self.service_names:
            self.health.set(name, status)

    def set_serving(self) -> None:
        if self.state is State.LOADING:
            self.state = State.SERVING
            self._report(_SERVING)

    def start_draining(self) -> None:
        """Health NOT_SERVING, new Hotmerge RPCs refused with UNAVAILABLE from now on."""
        if self.state in (State.LOADING, State.SERVING):
            self.state = State.DRAINING
            self._report(_NOT_SERVING)
            self.health.enter_graceful_shutdown()  # ignores later set() calls

    def drain(self, grace_s: float) -> bool:
        """Start draining, then wait up to ``grace_s`` for in-flight RPCs; True if none is left."""
        self.start_draining()
        deadline = time.monotonic() + grace_s
        with self._idle:
            while self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning("grace period over with %d requests in flight", self._in_flight)
                    return False
                self._idle.wait(remaining)
        return True

    def stopped(self) -> None:
        self.state = State.STOPPED

    # -- request accounting ------------------------------------------------------------------

    def enter(self) -> bool:
        """Count one request in (False, not counted, when draining: refuse it)."""
        return self._enter()

    def exit(self) -> None:
        self._exit()

    def _enter(self) -> bool:
        with self._idle:
            if self.state is State.DRAINING or self.state is State.STOPPED:
                return False
            self._in_flight += 1
            return True

    def _exit(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _DrainInterceptor(self)


REFUSED = "this replica is draining (shutting down); retry on another replica"


class _DrainInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(
            self.lifecycle.guarded_prefix
        ):
            return handler
        if handler.request_streaming:
            return handler  # no client-streaming RPCs in hotmerge.v1
        lc = self.lifecycle

        async def enter(request, context) -> None:
            if not lc._enter():
                await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED)

        return wrap_handler(handler, enter, lc._exit)
