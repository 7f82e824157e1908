"""Incremental detokenization and stop sequences, one TextStream per request."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

PROMPT_CONTEXT = 5  # prompt tokens kept as decode context, so the first token's spacing is right


def text_decoder(tokenizer) -> Callable[[Sequence[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)``, calling the Rust tokenizer directly
    when that is all transformers would do (its Python wrapper costs 3x the decode itself, and
    the worker decodes twice per generated token)."""
    from transformers import PreTrainedTokenizerFast as Fast

    cls = type(tokenizer)
    plain = (
        isinstance(tokenizer, Fast)
        and cls.decode is Fast.decode
        and cls._decode is Fast._decode
        and not tokenizer.clean_up_tokenization_spaces
    )
    decode = tokenizer.backend_tokenizer.decode if plain else tokenizer.decode
    return functools.partial(decode, skip_special_tokens=True)


class TextStream:
    """Incremental detokenization plus stop sequences, for one row.

    Text is decoded over a sliding window of ids (so a multi-byte character split over tokens
    comes out whole, once complete). Text that might be the start of a stop sequence is held
    back until it is known not to be; a found stop sequence and everything after it are cut.
    """

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        prompt_ids: Sequence[int],
        stop: Sequence[str],
    ) -> None:
        self._decode = decode
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)
        self.before = decode(self.ids)  # the text of ids[prefix:read], kept between pushes
        self.text = ""  # generated text so far (stop sequence cut)
        self.emitted = 0  # characters of self.text already handed out
        self.stop = tuple(s for s in stop if s)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text to emit now, whether a stop sequence was found)."""
        self.ids.append(token_id)
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(self.before) and not after.endswith("\ufffd"):
            self.text += after[len(self.before) :]
            self.prefix, self.read = self.read, len(self.ids)
            self.before = self._decode(self.ids[self.prefix :])
        if not self.stop:
            return self.flush(), False
        # Text before `emitted` was checked to start no stop sequence, so search from there.
        hits = [i for s in self.stop if (i := self.text.find(s, self.emitted)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self.flush(), True
        safe = len(self.text) - self._held_suffix()
        out, self.emitted = self.text[self.emitted : safe], max(self.emitted, safe)
        return out, False

    def _held_suffix(self) -> int:
        """Length of the longest tail of the text that begins some stop sequence."""
        tail = self.text[self.emitted :]
        for n in range(min(len(tail), max(len(s) for s in self.stop) - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stop):
                return n
        return 0

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out
