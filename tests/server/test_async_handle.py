"""A generation handle read from an event loop (``api/async_handle.py``): tokens put by another
thread arrive in order, then the result; errors and the deadline end the reading, and a reader
that stops early cancels the request's work."""

from __future__ import annotations

import asyncio
import functools
import threading
import time

import pytest
from hotmerge.api.async_handle import result, token_events
from hotmerge.engine import GenerationHandle
from hotmerge.errors import DeadlineExceeded, InvalidArgument
from hotmerge.generation import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Timings,
    TokenEvent,
)


def handle(deadline: float | None = None) -> GenerationHandle:
    return GenerationHandle(GenerationRequest(inputs="x"), deadline)


def finished(tokens: list[TokenEvent]) -> GenerationResult:
    text = "".join(t.text for t in tokens)
    return GenerationResult(text, FinishReason.LENGTH, len(tokens), tokens, Timings())


class Putter(threading.Thread):
    """A worker thread putting ``items`` one by one, as the engine's does; what ``_put``
    raised there (nothing may: the engine thread serves every other request too)."""

    def __init__(self, h: GenerationHandle, items, gap_s: float = 0.002) -> None:
        super().__init__()
        self.h, self.items, self.gap_s, self.errors = h, items, gap_s, []
        self.start()

    def run(self) -> None:
        for item in self.items:
            time.sleep(self.gap_s)
            try:
                self.h._put(item)
            except Exception as exc:
                self.errors.append(exc)

    def join(self, timeout=None) -> None:
        super().join(timeout)
        assert not self.errors


def put_later(h: GenerationHandle, items, gap_s: float = 0.002) -> Putter:
    return Putter(h, items, gap_s)


def test_tokens_from_another_thread_arrive_in_order_then_the_result():
    tokens = [TokenEvent(i, f"t{i}", -0.1 * i) for i in range(40)]
    h = handle()

    async def read() -> list[TokenEvent]:
        return [event async for event in token_events(h)]

    h._put(tokens[0])  # queued before the reader starts: not lost
    thread = put_later(h, [*tokens[1:], finished(tokens)], gap_s=0.0005)
    got = asyncio.run(read())
    thread.join()
    assert got == tokens
    assert h.result is not None and h.result.generated_text == "".join(t.text for t in tokens)
    assert not h.cancelled


def test_the_requests_error_is_raised_and_result_waits_for_the_end():
    h = handle()
    thread = put_later(h, [TokenEvent(1, "a", 0.0), InvalidArgument("bad")])
    with pytest.raises(InvalidArgument, match="bad"):
        asyncio.run(result(h))
    thread.join()
    h2 = handle()
    thread = put_later(h2, [TokenEvent(1, "a", 0.0), finished([TokenEvent(1, "a", 0.0)])])
    assert asyncio.run(result(h2)).generated_tokens == 1
    thread.join()


def test_the_deadline_ends_the_reading_and_the_work():
    h = handle(deadline=time.monotonic() + 0.1)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        asyncio.run(result(h))
    assert 0.08 < time.monotonic() - started < 2.0
    assert h.cancelled


def test_a_reader_that_stops_early_cancels_the_work():
    h = handle()
    # Tokens keep coming after the reader and its loop are gone, as until the worker sees the
    # cancel: putting them must not fail on the worker thread.
    thread = put_later(h, [TokenEvent(i, "x", 0.0) for i in range(3)], gap_s=0.05)

    async def first_then_cancel() -> None:
        task = asyncio.current_task()
        async for _ in token_events(h):
            task.cancel()  # the client went away: gRPC cancels the RPC's task
            await asyncio.sleep(0)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(first_then_cancel())
    thread.join()
    assert h.cancelled


def test_many_streams_on_one_loop_each_get_their_tokens():
    """The engine thread puts a step's token on every handle at once; the loop is woken once
    for all of them (``_LoopWaker``) and every reader gets every token, in order."""
    handles = [handle(deadline=time.monotonic() + 30) for _ in range(16)]  # a lost wake-up fails
    steps = 30

    def engine() -> None:
        for step in range(steps):
            for i, h in enumerate(handles):
                h._put(TokenEvent(step, f"{i}:{step}", 0.0))
            time.sleep(0.001)
        for h in handles:
            h._put(finished([]))

    async def read_all() -> list[list[str]]:
        async def read(h: GenerationHandle) -> list[str]:
            return [event.text async for event in token_events(h)]

        thread = threading.Thread(target=engine)
        thread.start()
        got = await asyncio.gather(*(read(h) for h in handles))
        thread.join()
        return got

    got = asyncio.run(read_all())
    assert got == [[f"{i}:{step}" for step in range(steps)] for i in range(16)]


def test_tokens_put_after_the_loop_closed_are_dropped_without_error():
    """A reader whose loop closed without its cleanup (the server stopped mid-stream): the
    worker's later puts must not fail, nor keep events for that loop."""
    from hotmerge.api.async_handle import _waker

    h = handle()
    loop = asyncio.new_event_loop()

    async def register():
        h.on_event(functools.partial(_waker(loop).wake, asyncio.Event()))

    loop.run_until_complete(register())
    waker = _waker(loop)
    loop.close()
    thread = put_later(h, [TokenEvent(i, "x", 0.0) for i in range(3)], gap_s=0.0)
    thread.join()
    assert waker._pending == [] and not waker._scheduled
