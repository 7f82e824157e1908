"""Request limits checked before work is done, independent of the engine's internals.

Each function raises ``InvalidArgument`` (or returns a bound) with the limit in the message, so
any engine can call them at the same points: ``check_temperature`` with the other sampling
parameters, ``check_prompt_bytes`` before tokenizing, ``check_max_new_tokens`` once the prompt's
token count is known, ``queue_deadline`` when a request enters the queue.
"""

from __future__ import annotations

from hotmerge.errors import InvalidArgument

# Below this, logits / temperature overflow float32 (1e-45 gives inf, then NaN probabilities);
# such a temperature is greedy in effect, which do_sample=false says exactly.
MIN_TEMPERATURE = 1e-3
# No tokenizer in use has tokens longer than this many UTF-8 bytes: a prompt longer than
# max_input_tokens * this is over the limit whatever it tokenizes to, and is refused untokenized.
MAX_BYTES_PER_TOKEN = 64
# A request waits at most this long in the engine's queue without a deadline of its own.
MAX_QUEUE_WAIT_S = 60.0


def check_temperature(temperature: float) -> None:
    if 0 < temperature < MIN_TEMPERATURE:
        raise InvalidArgument(
            f"parameters.temperature must be 0 (unset) or >= {MIN_TEMPERATURE:g}, got "
            f"{temperature!r}; for greedy decoding leave it unset with do_sample false"
        )


def check_prompt_bytes(text: str, max_input_tokens: int) -> None:
    """Refuse a prompt that cannot fit ``max_input_tokens`` before spending time tokenizing."""
    limit = max_input_tokens * MAX_BYTES_PER_TOKEN
    nbytes = len(text.encode("utf-8", "surrogatepass"))  # milliseconds, where tokenizing is s
    if nbytes > limit:
        raise InvalidArgument(
            f"inputs is {nbytes} bytes, more than can fit max_input_tokens={max_input_tokens} "
            f"(at most {limit} bytes are accepted); shorten the prompt"
        )


def check_max_new_tokens(max_new_tokens: int, prompt_tokens: int, max_total_tokens: int) -> None:
    """The prompt and the tokens asked for must fit ``max_total_tokens`` (refused, not capped)."""
    room = max_total_tokens - prompt_tokens
    if max_new_tokens > room:
        raise InvalidArgument(
            f"parameters.max_new_tokens is {max_new_tokens} but the prompt is {prompt_tokens} "
            f"tokens and max_total_tokens is {max_total_tokens}: give max_new_tokens <= {room}"
        )


def queue_deadline(deadline: float | None, now: float, max_wait_s: float = MAX_QUEUE_WAIT_S):
    """When a request entering the queue at ``now`` (monotonic) must have left it."""
    bound = now + max_wait_s
    return bound if deadline is None else min(deadline, bound)
