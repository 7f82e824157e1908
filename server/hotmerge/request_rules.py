"""The request rule book: every rule a generation request must follow, in one place.

``validate(request, limits, encode)`` is called once per request, by the request path
(``api/core.py``) before the engine sees the request; it checks the parameters, the adapter
choice and the prompt (on its byte size before tokenizing, then its tokens), and returns the
prompt's token ids, which the engine uses as given. The fronts (gRPC, LoRAX, OpenAI) only
translate their wire format and apply defaults; each passes a :class:`Wire` so that every
message names the field as that client spelled it (``parameters.max_new_tokens``,
``max_tokens``, ...). The engine checks nothing of its own: it trusts what passed here.

Merge specs: ``merging/spec.parse_merge_spec`` checks a spec's shape (ids, weights, strategy,
density, ...); ``check_merge_spec`` and ``check_adapter_rank`` check what this server can serve,
for ``Merge`` and ``Generate`` alike.

``max_new_tokens: 0`` scores the prompt only: it needs ``prompt_logprobs``, and a front whose
wire format refuses it (LoRAX) says so with ``Wire(scores_prompt=False)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from hotmerge.errors import InvalidArgument
from hotmerge.generation import GenerationRequest, SamplingParams
from hotmerge.merging.spec import FIELD as MERGE_FIELD
from hotmerge.merging.spec import MergeSpec

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 512  # per stop sequence: each is matched against the text at every token
# Below this, logits / temperature overflow float32 (1e-45 gives inf, then NaN probabilities);
# such a temperature is greedy in effect, which do_sample=false says exactly.
MIN_TEMPERATURE = 1e-3
# No tokenizer in use has tokens longer than this many UTF-8 bytes: a prompt longer than
# max_input_tokens * this is over the limit whatever it tokenizes to, and is refused untokenized.
MAX_BYTES_PER_TOKEN = 64
# A request waits at most this long in the engine's queue without a deadline of its own.
MAX_QUEUE_WAIT_S = 60.0


@dataclass(frozen=True)
class RequestLimits:
    """What the serving engine can take (the request path builds it from the engine)."""

    max_input_tokens: int
    max_total_tokens: int
    kv_capacity_tokens: int  # a request's prompt + max_new_tokens must fit the whole KV cache
    vocab_size: int
    max_lora_rank: int | None = None  # None: adapters of any rank fit a slot
    default_max_new_tokens: int = 64  # named in messages (leave max_new_tokens unset for it)


@dataclass(frozen=True)
class Wire:
    """How one front spells the request's fields, so that messages name the client's field.

    ``names`` maps the engine's field names (``max_new_tokens``, ``inputs``, ...) to the
    client's; a sampling parameter not listed is ``parameters.<name>``. ``scores_prompt``: the
    wire format accepts ``max_new_tokens: 0`` (prompt logprobs only)."""

    names: Mapping[str, str] = field(default_factory=dict)
    scores_prompt: bool = True

    def __call__(self, name: str) -> str:
        if name in self.names:
            return self.names[name]
        return name if name in ("inputs", "input_ids", "adapter_id") else f"parameters.{name}"


GRPC = Wire()


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def validate(
    request: GenerationRequest,
    limits: RequestLimits,
    encode: Callable[[str], list[int]],
    *,
    wire: Wire = GRPC,
    merged: bool = False,
) -> list[int]:
    """Check ``request`` (``merged``: it came with an inline merge spec); return the prompt's
    token ids (``inputs`` encoded with ``encode``, or ``input_ids`` as given). Raises
    InvalidArgument naming the client's field and the fix."""
    check_params(request.params, limits, wire)
    if request.adapter_id is not None and not request.adapter_id:
        raise InvalidArgument(
            f"{wire('adapter_id')} is empty: name an adapter, or leave it unset for the base model"
        )
    if merged and request.adapter_id is not None:
        raise InvalidArgument(f"give {wire('adapter_id')} or {MERGE_FIELD}, not both")
    ids = prompt_ids(request, limits, encode, wire)
    check_fits(request.params, len(ids), limits, wire)
    return ids


def check_params(params: SamplingParams, limits: RequestLimits, wire: Wire = GRPC) -> None:
    def bad(name: str, rule: str, value) -> InvalidArgument:
        return InvalidArgument(f"{wire(name)} {rule}, got {value!r}")

    n = params.max_new_tokens
    least = 0 if wire.scores_prompt else 1
    if not isinstance(n, int) or isinstance(n, bool) or n < least:
        raise InvalidArgument(
            f"{wire('max_new_tokens')} must be >= {least}, got {n!r} (leave it unset for the "
            f"server default of {limits.default_max_new_tokens})"
        )
    if n == 0 and not params.prompt_logprobs:
        raise InvalidArgument(
            f"{wire('max_new_tokens')} is 0, which only scores the prompt: set "
            f"{wire('prompt_logprobs')} too, or ask for at least 1 token"
        )
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise bad("temperature", "must be a finite number >= 0", params.temperature)
    if 0 < params.temperature < MIN_TEMPERATURE:
        raise InvalidArgument(
            f"{wire('temperature')} must be 0 (unset) or >= {MIN_TEMPERATURE:g}, got "
            f"{params.temperature!r}; for greedy decoding leave it unset with do_sample false"
        )
    if not 0 < params.top_p <= 1:
        raise bad("top_p", "must be in (0, 1]", params.top_p)
    if params.top_k < 0:
        raise bad("top_k", "must be >= 0 (0: off)", params.top_k)
    if not math.isfinite(params.repetition_penalty) or params.repetition_penalty <= 0:
        raise bad("repetition_penalty", "must be a finite number > 0", params.repetition_penalty)
    if params.seed is not None and not 0 <= params.seed < 2**64:
        raise bad("seed", "must be in [0, 2**64)", params.seed)
    if len(params.stop) > MAX_STOP_SEQUENCES:
        raise InvalidArgument(
            f"{wire('stop')} has {len(params.stop)} sequences; give at most {MAX_STOP_SEQUENCES}"
        )
    if any(not s for s in params.stop):
        raise bad("stop", "must not contain empty strings", params.stop)
    if any(len(s) > MAX_STOP_CHARS for s in params.stop):
        raise InvalidArgument(
            f"{wire('stop')}: a stop sequence is longer than {MAX_STOP_CHARS} characters"
        )


def prompt_ids(
    request: GenerationRequest,
    limits: RequestLimits,
    encode: Callable[[str], list[int]],
    wire: Wire = GRPC,
) -> list[int]:
    """The prompt's token ids: ``inputs`` encoded (refused first if its bytes cannot fit), or
    ``input_ids`` checked against the vocabulary."""
    if request.inputs is not None and request.input_ids is not None:
        raise InvalidArgument(
            f"give {wire('inputs')} (text) or {wire('input_ids')} (token ids), not both"
        )
    if request.input_ids is not None:
        name, ids = wire("input_ids"), list(request.input_ids)
        vocab = limits.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidArgument(
                f"{name}: {bad[0]!r} is not a token id of this model (0 <= id < {vocab})"
            )
    elif request.inputs is None:
        raise InvalidArgument(f"{wire('inputs')} is empty: give the prompt text (or token ids)")
    elif not isinstance(request.inputs, str):
        raise InvalidArgument(f"{wire('inputs')} must be a string")
    else:
        name = wire("inputs")
        check_prompt_bytes(request.inputs, limits.max_input_tokens, name)
        ids = encode(request.inputs)
    if not ids:
        raise InvalidArgument(f"{name} is empty (it must give at least one token)")
    if len(ids) > limits.max_input_tokens:
        raise InvalidArgument(
            f"{name} is {len(ids)} tokens, more than max_input_tokens={limits.max_input_tokens}"
        )
    return ids


def check_prompt_bytes(text: str, max_input_tokens: int, name: str = "inputs") -> None:
    """Refuse a prompt that cannot fit ``max_input_tokens`` before spending time tokenizing."""
    limit = max_input_tokens * MAX_BYTES_PER_TOKEN
    nbytes = len(text.encode("utf-8", "surrogatepass"))  # milliseconds, where tokenizing is s
    if nbytes > limit:
        raise InvalidArgument(
            f"{name} is {nbytes} bytes, more than can fit max_input_tokens={max_input_tokens} "
            f"(at most {limit} bytes are accepted); shorten the prompt"
        )


def check_fits(
    params: SamplingParams, prompt_tokens: int, limits: RequestLimits, wire: Wire = GRPC
) -> None:
    """The prompt and the tokens asked for must fit ``max_total_tokens`` and the KV cache
    (refused, not capped)."""
    n, name = params.max_new_tokens, wire("max_new_tokens")
    room = limits.max_total_tokens - prompt_tokens
    if n > room:
        raise InvalidArgument(
            f"{name} is {n} but the prompt is {prompt_tokens} tokens and max_total_tokens is "
            f"{limits.max_total_tokens}: give {_leaf(name)} <= {room}"
        )
    worst = prompt_tokens + n
    if worst > limits.kv_capacity_tokens:
        raise InvalidArgument(
            f"the request needs up to {worst} tokens of KV cache (prompt {prompt_tokens} + "
            f"{_leaf(name)} {n}), more than the cache's {limits.kv_capacity_tokens}; lower "
            f"{_leaf(name)}"
        )


def queue_deadline(deadline: float | None, now: float, max_wait_s: float = MAX_QUEUE_WAIT_S):
    """When a request entering the queue at ``now`` (monotonic) must have left it."""
    bound = now + max_wait_s
    return bound if deadline is None else min(deadline, bound)


# -- adapters and merge specs: the same rules for Merge and Generate ----------------------------


def rank_problem(rank: int, max_rank: int | None) -> str | None:
    """Why an adapter of ``rank`` cannot go into an adapter slot (None: it can)."""
    if max_rank is not None and rank > max_rank:
        return (
            f"rank {rank} is more than the engine's max LoRA rank {max_rank} "
            "(start the server with a larger --max-lora-rank)"
        )
    return None


def check_merge_spec(spec: MergeSpec, limits: RequestLimits) -> None:
    """Refuse, before merging, a spec whose merged adapter could never be served."""
    rank, most = spec.params.svd_rank, limits.max_lora_rank
    if rank is not None and most is not None and rank > most:
        raise InvalidArgument(
            f"{MERGE_FIELD}.svd_rank is {rank}, more than the engine's max LoRA rank {most}: "
            f"give svd_rank <= {most} (or start the server with a larger --max-lora-rank)"
        )


def check_adapter_rank(rank: int, limits: RequestLimits, name: str) -> None:
    """Refuse a (merged) adapter that no adapter slot can hold; ``name`` says which."""
    problem = rank_problem(rank, limits.max_lora_rank)
    if problem is not None:
        raise InvalidArgument(f"{name}: {problem}")
