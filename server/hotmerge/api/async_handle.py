"""A generation handle read from an event loop: tokens as they come, without a thread a request.

The worker thread queues each event on the handle and wakes the loop with one
``call_soon_threadsafe``; the loop takes what is queued (``GenerationHandle.poll``). A thread a
stream that blocks on the handle's queue costs the sync gRPC server about 100 µs of CPU a streamed
token, ``grpc.aio`` about 45 (``benchmarks/grpc_stream_cost.py``): the GIL time the engine
thread loses to the front at high concurrency.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from hotmerge.engine import GenerationHandle
from hotmerge.generation import GenerationResult, TokenEvent


async def token_events(handle: GenerationHandle) -> AsyncIterator[TokenEvent]:
    """The handle's tokens until it finishes (``handle.result``), bounded by its deadline.

    Raises the request's error, or DeadlineExceeded at the deadline; a caller that stops early
    (its client left: the task is cancelled) cancels the request's work."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def waker() -> None:  # on the worker thread
        with contextlib.suppress(RuntimeError):  # the loop has closed: no one reads any more
            loop.call_soon_threadsafe(wake.set)

    handle.on_event(waker)
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
