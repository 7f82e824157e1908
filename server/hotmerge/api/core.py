"""The one request path every front calls: gRPC, LoRAX REST and OpenAI translate their wire
format into these calls and the results back, and nothing else.

``sampling_params`` applies the defaults (it checks nothing); ``RequestPath.submit`` checks the
request once with the rule book (``request_rules.validate``: parameters, adapter choice, the
prompt and its tokens), then is the one place a request's adapter is resolved: an adapter id
(from the adapter store), a named merge, or an inline merge spec (through the Merger, under
``request_rules.check_merge_spec`` like ``Merge``), each into a pinned ``AdapterLease`` (extend
here for new kinds of adapter); it hands the tokenized request and its lease to
``Engine.submit`` with its deadline, and returns the handle (iterate it, ``wait()``, or
``cancel()`` it when the caller goes away). The fronts list and load adapters through
``RequestPath.ready_store``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hotmerge import request_rules as rules
from hotmerge.adapters.store import AdapterStore
from hotmerge.engine import AdapterLease, Engine, GenerationHandle
from hotmerge.errors import Unavailable
from hotmerge.generation import GenerationRequest, GenerationResult, SamplingParams
from hotmerge.merging.merger import MergeOutcome, Merger
from hotmerge.merging.named import NamedMerge, NamedMerges
from hotmerge.merging.spec import MergeSpec, parse_merge_spec
from hotmerge.metrics import Metrics
from hotmerge.request_rules import RequestLimits, Wire
from hotmerge.v1 import hotmerge_pb2 as pb

log = logging.getLogger(__name__)


def new_request_id() -> str:
    return secrets.token_hex(6)


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id_or_new(given: str | None) -> str:
    """A caller's request id (a balancer's x-request-id) if it is a plain token of at most 64
    characters, else a fresh one: it goes into logs and response headers as given."""
    return given if given and _REQUEST_ID.fullmatch(given) else new_request_id()


def sampling_params(
    *,
    default_max_new_tokens: int,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    do_sample: bool = False,
    seed: int | None = None,
    repetition_penalty: float | None = None,
    stop: Sequence[str] = (),
    details: bool = False,
    prompt_logprobs: bool = False,
) -> SamplingParams:
    """Defaults applied; None means unset. The rule book checks the result at submit.

    As in LoRAX, a sampling knob implies sampling: a temperature other than 1, top_p < 1 or
    top_k > 0 turn do_sample on (a temperature of 0 is greedy).
    """
    temp = 1.0 if temperature is None else float(temperature)
    p = 1.0 if top_p is None else float(top_p)
    k = top_k or 0
    return SamplingParams(
        max_new_tokens=default_max_new_tokens if max_new_tokens is None else max_new_tokens,
        temperature=temp,
        top_p=p,
        top_k=k,
        do_sample=bool(do_sample) or (temp not in (0.0, 1.0)) or p < 1.0 or k > 0,
        seed=seed,
        repetition_penalty=1.0 if repetition_penalty is None else float(repetition_penalty),
        stop=tuple(stop),
        details=details,
        prompt_logprobs=prompt_logprobs,
    )


def generation_request(
    params: SamplingParams,
    *,
    inputs: str | None = None,
    input_ids: Sequence[int] | None = None,
    adapter_id: str | None = None,
) -> GenerationRequest:
    """The engine's request (empty ``inputs`` / ``input_ids`` count as unset); the rule book
    checks it at submit."""
    return GenerationRequest(
        inputs=inputs or None,
        input_ids=tuple(input_ids) if input_ids else None,
        params=params,
        adapter_id=adapter_id,
    )


@functools.lru_cache(maxsize=4096)
def _parse_spec_cached(serialized: bytes, max_adapters: int) -> MergeSpec:
    """``parse_merge_spec`` memoised on the message's bytes: repeated specs skip validation."""
    return parse_merge_spec(pb.MergedAdapters.FromString(serialized), max_adapters=max_adapters)


def stored_adapter_lease(store: AdapterStore, adapter_id: str) -> AdapterLease:
    """Adapter ``adapter_id`` loaded from the store and pinned until the lease is released;
    raises NotFound, InvalidArgument or ResourceExhausted."""
    loaded, load_ms = store.acquire(adapter_id)
    return AdapterLease(
        loaded.weights,
        load_ms,
        lambda: store.release(adapter_id),
        name=adapter_id,
        kv_key=loaded.info.content_key,
    )


@dataclass
class Submission:
    """A request handed to the engine: iterate ``handle`` or ``handle.wait()``."""

    request: GenerationRequest  # as the front built it (``inputs`` kept, for echo)
    handle: GenerationHandle
    merge: MergeOutcome | None  # set for an inline spec or a named merge
    adapter: str | None  # the adapter id or named merge it asked for (logs, model names)


class RequestPath:
    """The engine, merger and named merges every front uses. Until ``attach`` (the model is
    loading) every call raises Unavailable."""

    def __init__(
        self,
        *,
        default_max_new_tokens: int = 64,
        max_merge_adapters: int = 16,
        metrics: Metrics | None = None,
    ) -> None:
        self.default_max_new_tokens = default_max_new_tokens
        self.max_merge_adapters = max_merge_adapters
        self.metrics = metrics or Metrics()
        self.engine: Engine | None = None
        self.store: AdapterStore | None = None
        self.merger: Merger | None = None
        self.named: NamedMerges | None = None
        self.limits: RequestLimits | None = None

    def attach(
        self, engine: Engine, store: AdapterStore, merger: Merger, named: NamedMerges
    ) -> None:
        self.store, self.merger, self.named = store, merger, named
        self.limits = RequestLimits(
            max_input_tokens=engine.max_input_tokens,
            max_total_tokens=engine.max_total_tokens,
            kv_capacity_tokens=engine.kv_capacity_tokens,
            vocab_size=engine.runner.vocab_size,
            max_lora_rank=getattr(engine.runner.adapters, "max_rank", None),
            default_max_new_tokens=self.default_max_new_tokens,
        )
        self.engine = engine

    def ready_engine(self) -> Engine:
        if self.engine is None or self.merger is None or self.named is None:
            raise Unavailable("the model is still loading; retry when health reports SERVING")
        return self.engine

    def ready_store(self) -> AdapterStore:
        """The adapter store (to list, load or unload adapters); Unavailable while loading."""
        self.ready_engine()
        return self.store

    def params(self, **kwargs) -> SamplingParams:
        return sampling_params(default_max_new_tokens=self.default_max_new_tokens, **kwargs)

    def parse_spec(self, msg: pb.MergedAdapters) -> MergeSpec:
        wire = msg.SerializeToString(deterministic=True)
        return _parse_spec_cached(wire, self.max_merge_adapters)

    def _acquire(
        self, spec: MergeSpec, name: str | None, deadline: float | None, cancelled
    ) -> tuple[AdapterLease, MergeOutcome]:
        """The merged adapter, under the same rules for Merge and Generate."""
        rules.check_merge_spec(spec, self.limits)
        lease, outcome = self.merger.acquire(spec, deadline=deadline, cancelled=cancelled)
        lease.name = name or outcome.merge_key
        try:
            rules.check_adapter_rank(outcome.rank, self.limits, f"merged adapter {lease.name}")
        except BaseException:
            lease.release()
            raise
        return lease, outcome

    def submit(
        self,
        request: GenerationRequest,
        *,
        merged_adapters: pb.MergedAdapters | None = None,
        deadline: float | None = None,
        cancelled: Callable[[], bool] | None = None,
        wire: Wire = rules.GRPC,
    ) -> Submission:
        """Check the request (the rule book, once), resolve the adapter, submit to the engine.

        ``request.adapter_id`` may name an adapter or a named merge; ``merged_adapters`` is an
        inline spec (not with an adapter_id). ``deadline`` is on the time.monotonic() clock;
        it and ``cancelled`` (the client went away) bound the waits and the merge. ``wire``
        names the fields as the front's client spells them, in error messages.
        """
        arrived = time.perf_counter()  # total_ms counts merges and loads from here
        engine = self.ready_engine()
        merged = merged_adapters is not None
        with engine.arriving():  # an idle engine waits for it to batch it with others
            ids = rules.validate(
                request, self.limits, engine.runner.encode, wire=wire, merged=merged
            )
            tokenized = dataclasses.replace(request, inputs=None, input_ids=tuple(ids))
            lease = outcome = None
            adapter = request.adapter_id
            if merged:
                spec = self.parse_spec(merged_adapters)
                lease, outcome = self._acquire(spec, None, deadline, cancelled)
            elif (named := self.named.get(adapter or "")) is not None:
                lease, outcome = self._acquire(named.spec, named.name, deadline, cancelled)
            elif adapter is not None:
                lease = stored_adapter_lease(self.store, adapter)
            handle = engine.submit(tokenized, lease=lease, deadline=deadline, arrived=arrived)
            return Submission(request, handle, outcome, adapter)

    def merge(
        self,
        merged_adapters: pb.MergedAdapters,
        name: str = "",
        *,
        replace: bool = False,
        deadline: float | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[MergeOutcome, NamedMerge | None]:
        """Merge a spec (warm the cache); with a name, also register it as a named merge, only
        once the merge succeeded (an existing name only with ``replace``). The spec must be one
        Generate would serve."""
        self.ready_engine()
        if name:
            self.named.check(name, replace=replace, message=merged_adapters)
        spec = self.parse_spec(merged_adapters)
        lease, outcome = self._acquire(spec, name or None, deadline, cancelled)
        lease.release()
        named = self.named.register(name, merged_adapters, replace=replace) if name else None
        return outcome, named

    def finished(self, request_id: str, method: str, sub: Submission) -> None:
        """Count and log a request that completed."""
        result = sub.handle.result
        self.metrics.generated_tokens.inc(result.generated_tokens)
        log_done(request_id, method, sub, result)


def log_done(request_id: str, method: str, sub: Submission, result: GenerationResult) -> None:
    t, merge = result.timings, sub.merge
    adapter = sub.adapter or "-"
    if merge is not None:  # "name=my-merge key=m-...(hit)", or the key alone for inline specs
        name = f"{sub.adapter} key=" if sub.adapter else ""
        adapter = f"{name}{merge.merge_key}({'hit' if merge.cache_hit else 'miss'})"
    log.info(
        "request %s %s adapter=%s tokens=%d prompt=%d finish=%s queue=%.1fms load=%.1fms "
        "merge=%.2fms prefill=%.1fms decode=%.1fms total=%.1fms",
        request_id,
        method,
        adapter,
        result.generated_tokens,
        result.prompt_tokens,
        result.finish_reason.value,
        t.queue_ms,
        t.adapter_load_ms,
        t.merge_ms,
        t.prefill_ms,
        t.decode_ms,
        t.total_ms,
    )


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: the first prompt token's logprob goes out as null."""
    return x if math.isfinite(x) else None
