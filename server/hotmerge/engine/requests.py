"""The request side of the engine: the adapter a request holds and the handle a caller waits
on. The rules a request must follow are the request path's (``hotmerge.request_rules``)."""

from __future__ import annotations

import itertools
import queue
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

from hotmerge_kernels.layout import FlatAdapter

from hotmerge.errors import DeadlineExceeded, HotmergeError
from hotmerge.generation import GenerationRequest, GenerationResult, TokenEvent


@dataclass(eq=False)
class AdapterLease:
    """The adapter a request runs with, held (pinned) until the request ends."""

    weights: FlatAdapter | None
    load_ms: float = 0.0
    on_release: Callable[[], None] | None = None  # unpins it; called once
    merge_ms: float = 0.0  # spent merging it (a merged adapter on a cache miss)
    name: str | None = None  # adapter id, named merge or merge key: for logs and metrics
    # Names the adapter's content (``id@revision``, a merge key), so KV computed with it can be
    # reused by a later request (prefix caching); None: this very object names it.
    kv_key: str | None = None

    def release(self) -> None:
        on_release, self.on_release = self.on_release, None
        if on_release is not None:
            on_release()


class AdapterKeys:
    """The prefix cache's key of a lease's adapter: its ``kv_key``, else a key of its own
    for that very object (never reused, even when another object later gets its id)."""

    def __init__(self) -> None:
        self._own: dict[int, tuple[weakref.ref, int]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # request threads submit at once

    def key(self, lease: AdapterLease) -> Hashable:
        adapter = lease.weights
        if adapter is None or lease.kv_key is not None:
            return lease.kv_key
        with self._lock:
            known = self._own.get(id(adapter))
            if known is None or known[0]() is not adapter:
                known = self._own[id(adapter)] = (weakref.ref(adapter), next(self._ids))
                if len(self._own) > 4096:  # drop the keys of adapters gone
                    self._own = {i: k for i, k in self._own.items() if k[0]() is not None}
            return ("object", known[1])


class GenerationHandle:
    """One submitted request: iterate it for its tokens, or :meth:`wait` for the result."""

    def __init__(self, request: GenerationRequest, deadline: float | None) -> None:
        self.request = request
        self.deadline = deadline  # time.monotonic() value
        self.result: GenerationResult | None = None  # set when iteration finished normally
        self._error: HotmergeError | None = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._waker: Callable[[], None] | None = None

    def cancel(self) -> None:
        """Stop work for this request; its row leaves the batch at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) >= self.deadline

    def __iter__(self) -> Iterator[TokenEvent]:
        """Tokens as they come. Iterating again after the end yields nothing (or re-raises)."""
        if self.result is not None:
            return
        if self._error is not None:
            raise self._error
        try:
            while True:
                timeout = None
                if self.deadline is not None:
                    timeout = max(0.0, self.deadline - time.monotonic())
                try:
                    item = self._events.get(timeout=timeout)
                except queue.Empty:
                    raise self.expire() from None
                event = self._take(item)
                if event is None:
                    return
                yield event
        finally:
            if self.result is None:  # abandoned, failed or expired: stop the worker's work too
                self.cancel()

    def wait(self) -> GenerationResult:
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    # -- for an event loop (``api/async_handle.py``): no waits here -------------------------

    def on_event(self, waker: Callable[[], None] | None) -> None:
        """Call ``waker`` after each event is queued (on the worker thread: it must only hand
        over, e.g. ``loop.call_soon_threadsafe``), and once now if one is queued already;
        None: no more calls (the reader stopped)."""
        self._waker = waker
        if waker is not None and not self._events.empty():
            waker()

    def poll(self) -> TokenEvent | None:
        """The next token if one is queued, else None: also when the request has finished
        (``result`` set then). Raises the request's error, as iterating does."""
        if self._error is not None:
            raise self._error
        if self.result is not None:
            return None
        try:
            return self._take(self._events.get_nowait())
        except queue.Empty:
            return None

    def _take(self, item: TokenEvent | GenerationResult | HotmergeError) -> TokenEvent | None:
        """A queued item: a token is returned; the result is kept (None returned); an error is
        kept and raised."""
        if isinstance(item, TokenEvent):
            return item
        if isinstance(item, GenerationResult):
            self.result = item
            return None
        self._error = item
        raise item

    def expire(self) -> DeadlineExceeded:
        """The error of a caller that stopped waiting at the deadline; the work stops too."""
        self._error = DeadlineExceeded("deadline exceeded")
        self.cancel()
        return self._error

    # called by the worker
    def _put(self, item: TokenEvent | GenerationResult | BaseException) -> None:
        self._events.put(item)
        waker = self._waker
        if waker is not None:
            waker()
