"""A generation handle read from an event loop: tokens as they come, without a thread a request.

The worker thread queues each event on the handle and wakes the loop, once for all the events it
puts before the loop runs (``_LoopWaker``); the loop takes what is queued
(``GenerationHandle.poll``). A thread a stream blocked on the handle's queue, as the sync gRPC
server ran, cost about a third more CPU a streamed token (``benchmarks/grpc_stream_cost.py``):
GIL time the engine thread loses to the front at high concurrency.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import weakref
from collections.abc import AsyncIterator

from hotmerge.engine import GenerationHandle
from hotmerge.generation import GenerationResult, TokenEvent


class _LoopWaker:
    """Sets a loop's events from other threads with one ``call_soon_threadsafe`` for all the
    events set until the loop runs it: a step's tokens for every stream cost the engine thread
    one wake-up of the loop (a system call), not one a stream."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[asyncio.Event] = []
        self._scheduled = False

    def wake(self, event: asyncio.Event) -> None:
        with self._lock:
            self._pending.append(event)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._set_pending)
        except RuntimeError:  # the loop has closed: no one reads any more, keep nothing
            with self._lock:
                self._pending, self._scheduled = [], False

    def _set_pending(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for event in pending:
            event.set()


_wakers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _waker(loop: asyncio.AbstractEventLoop) -> _LoopWaker:
    waker = _wakers.get(loop)
    if waker is None:  # on the loop's thread: no other creates one for it meanwhile
        waker = _wakers[loop] = _LoopWaker(loop)
    return waker


async def token_events(handle: GenerationHandle) -> AsyncIterator[TokenEvent]:
    """The handle's tokens until it finishes (``handle.result``), bounded by its deadline.

    Raises the request's error, or DeadlineExceeded at the deadline; a caller that stops early
    (its client left: the task is cancelled) cancels the request's work."""
    wake = asyncio.Event()
    handle.on_event(functools.partial(_waker(asyncio.get_running_loop()).wake, wake))
    try:
        while True:
            wake.clear()  # before polling: an event queued after the poll sets it again
            event = handle.poll()
            if event is not None:
                yield event
                continue
            if handle.result is not None:
                return
            timeout = None
            if handle.deadline is not None:
                timeout = max(0.0, handle.deadline - time.monotonic())
            try:
                await asyncio.wait_for(wake.wait(), timeout)
            except TimeoutError:
                raise handle.expire() from None
    finally:
        handle.on_event(None)
        if handle.result is None:  # abandoned, failed or expired: stop the worker's work too
            handle.cancel()


async def result(handle: GenerationHandle) -> GenerationResult:
    """The finished result (the tokens taken and dropped on the way)."""
    async for _ in token_events(handle):
        pass
    assert handle.result is not None
    return handle.result
