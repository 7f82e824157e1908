"""The engine: a queue of generation requests and one worker thread that steps the batch.

Each step the worker asks the :class:`~hotmerge.engine.scheduler.Scheduler` for a plan (which
sequences join the batch, which adapters go into which slots, the decode rows and prompt
chunks), has the runner carry it out (every tensor operation; token ids and logprobs back),
hands the tokens back to the scheduler, and streams them to the requests' handles.

The loop itself, and how a step's host work overlaps the device's, is
:class:`~hotmerge.engine.worker.Worker`'s (``worker.py``); this module holds the queue, the
lifecycle and the request-facing surface.

Errors: requests come checked by the request path (``hotmerge.request_rules``);
:meth:`Engine.submit` raises InvalidArgument only for an adapter that does not fit the pool (its
lease is released). Iterating a :class:`GenerationHandle` raises Cancelled (cancel),
DeadlineExceeded (the deadline passed), Unavailable (engine stopped) or HotmergeError with code
INTERNAL (a failure inside the worker, which fails only the affected requests); a sequence whose
sampling parameters cannot be used fails alone (InvalidArgument).
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import threading
import time
from collections.abc import Iterator

from hotmerge import request_rules as rules
from hotmerge.engine.block_manager import BlockManager
from hotmerge.engine.config import EngineConfig
from hotmerge.engine.detok import TextStream, text_decoder
from hotmerge.engine.requests import AdapterKeys, AdapterLease, GenerationHandle
from hotmerge.engine.runner import ModelRunner
from hotmerge.engine.scheduler import Scheduler
from hotmerge.engine.sequence import Sequence
from hotmerge.engine.slots import SlotTable
from hotmerge.engine.stats import EngineStats
from hotmerge.engine.worker import Worker
from hotmerge.errors import (
    InvalidArgument,
    Unavailable,
)
from hotmerge.generation import GenerationRequest


def _token_limits(runner: ModelRunner, config: EngineConfig) -> tuple[int, int]:
    """(max_total_tokens, max_input_tokens) of ``config``, checked against what the runner
    was built for; raises InvalidArgument."""
    built, limit = runner.config, runner.max_total_tokens
    max_total = config.max_total_tokens or limit
    max_input = config.max_input_tokens or max_total - 1
    if max_total > limit:
        raise InvalidArgument(
            f"max_total_tokens ({max_total}) exceeds what the runner was built "
            f"for ({limit}, at most the model's max_position_embeddings)"
        )
    if not 1 <= max_input < max_total:
        raise InvalidArgument(
            f"max_input_tokens ({max_input}) must be >= 1 and less than "
            f"max_total_tokens ({max_total})"
        )
    if not 1 <= config.max_batch_size <= built.max_batch_size:
        raise InvalidArgument(
            f"max_batch_size must be in [1, {built.max_batch_size}] (what the runner was "
            f"built for), got {config.max_batch_size}"
        )
    return max_total, max_input


class Arrivals:
    """Requests on their way to the queue (``Engine.arriving``; read under the engine's
    condition). Until ``counted``, nothing says whether more are on the way: the idle engine
    waits all of ``batch_wait_ms``, as for a caller that submits to the engine directly."""

    def __init__(self) -> None:
        self.on_the_way = 0
        self.counted = False

    def expected(self) -> bool:
        return self.on_the_way > 0 or not self.counted


class Engine:
    def __init__(self, runner: ModelRunner, config: EngineConfig | None = None) -> None:
        """``config``: the runner's (what it was built for) unless given; its limits may only
        be tighter than the runner's."""
        self.runner = runner
        self.config = config = config or runner.config
        self.max_total_tokens, self.max_input_tokens = _token_limits(runner, config)
        self.max_batch_size = config.max_batch_size
        self.kv = BlockManager(
            runner.num_blocks,
            runner.block_size,
            prefix_caching=config.prefix_caching and runner.prefix_caching,
        )
        self._kv_keys = AdapterKeys()
        self.scheduler = Scheduler(
            self.kv,
            SlotTable(runner.adapters.num_slots),
            max_batch_size=self.max_batch_size,
            max_prefill_tokens=config.max_prefill_tokens,
            max_total_tokens=self.max_total_tokens,
            eos_token_ids=runner.eos_token_ids,
            mixed_steps=config.mixed_steps,
        )
        self._decode_text = text_decoder(runner.tokenizer)
        self.stats = EngineStats()
        self._cv = threading.Condition()  # guards the scheduler's queue, ``stopping``, arrivals
        self.arrivals = Arrivals()
        self._worker = Worker(self)
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._worker.stopping = False
        self._thread = threading.Thread(
            target=self._worker.run, name="hotmerge-engine", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the worker; requests still queued or running fail with Unavailable."""
        with self._cv:
            self._worker.stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._worker.stopping

    # -- gauges (read from other threads: approximate by design) ---------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def running_requests(self) -> int:
        return len(self.scheduler.running)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv.usage

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv.capacity_tokens

    def adapter_names(self) -> tuple[list[str], list[str]]:
        """Names of the adapters of running and of waiting requests."""

        def names(seqs) -> list[str]:
            return sorted({s.lease.name for s in seqs if s.lease.name})

        return names(list(self.scheduler.running)), names(list(self.scheduler.waiting))

    # -- submit -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Count a request from its receipt on the request path until it is queued or refused.
        Once requests come this way, an idle engine's wait for a batch (``batch_wait_ms``) ends
        as soon as none is on its way: a lone request is not held back, a burst still starts
        in one step."""
        with self._cv:
            self.arrivals.on_the_way += 1
            self.arrivals.counted = True
        try:
            yield
        finally:
            with self._cv:
                self.arrivals.on_the_way -= 1
                self._cv.notify_all()

    def submit(
        self,
        request: GenerationRequest,
        *,
        lease: AdapterLease | None = None,
        deadline: float | None = None,
        arrived: float | None = None,
    ) -> GenerationHandle:
        """Validate and queue. ``lease``: the adapter the request runs with (resolved and
        pinned by the request path; None: the base model), released when the request ends,
        also when submit raises. ``deadline`` is on the time.monotonic() clock; ``arrived``
        (time.perf_counter(); default: now) is where the request's total_ms starts."""
        submitted = time.perf_counter() if arrived is None else arrived
        lease = lease or AdapterLease(None)
        try:
            return self._submit(request, deadline, lease, submitted)
        except BaseException:
            lease.release()
            raise

    def _submit(
        self,
        request: GenerationRequest,
        deadline: float | None,
        lease: AdapterLease,
        submitted: float,
    ) -> GenerationHandle:
        if not self.running:
            raise Unavailable("the engine is not running")
        if request.adapter_id is not None and lease.weights is None:
            raise ValueError(f"adapter {request.adapter_id!r} was not resolved into a lease")
        seq = self._new_sequence(request, deadline, lease, submitted)
        with self._cv:
            if self._worker.stopping:
                raise Unavailable("the engine is shutting down")
            self.scheduler.add(seq)
            self._cv.notify_all()
        return seq.handle

    def _new_sequence(
        self,
        request: GenerationRequest,
        deadline: float | None,
        lease: AdapterLease,
        submitted: float,
    ) -> Sequence:
        """The request as a sequence (its rules were checked on the request path:
        ``request_rules.validate``); the adapter's fit to the pool is checked here."""
        params = request.params
        if request.input_ids is not None:
            prompt_ids = list(request.input_ids)
        else:  # callers that use the engine directly, like the tests
            prompt_ids = self.runner.encode(request.inputs)
        worst = len(prompt_ids) + params.max_new_tokens
        if not self.kv.fits_ever(worst):
            raise InvalidArgument(
                f"the prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens})"
                f" needs more than the whole KV cache ({self.kv.capacity_tokens} tokens); "
                "shorten the prompt or lower max_new_tokens"
            )
        if lease.weights is not None:
            reason = self.runner.adapters.check(lease.weights)
            if reason is not None:
                raise InvalidArgument(f"adapter {lease.name or ''}: {reason}".replace(" :", ":"))
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        handle = GenerationHandle(request, deadline)
        seq = Sequence(
            seq_id=next(self._ids),
            handle=handle,
            prompt_ids=list(prompt_ids),
            lease=lease,
            stream=TextStream(self._decode_text, prompt_ids, params.stop),
            seed=seed,
            submitted=submitted,
            queued=time.perf_counter(),
            queue_until=rules.queue_deadline(deadline, time.monotonic()),
            kv_key=self._kv_keys.key(lease),
        )
        seq.timings.adapter_load_ms = lease.load_ms
        seq.timings.merge_ms = lease.merge_ms
        return seq
