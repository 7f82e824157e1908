"""The skill interface and the seeded pool that splits a skill's prompts into train and held-out."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

SPLITS = ("train", "heldout")
HELDOUT_SIZE = 300


@dataclass(frozen=True)
class Example:
    prompt: str  # the user message (plain text, before the chat template)
    reference: str  # the expected answer text


class Skill(Protocol):
    name: str
    max_new_tokens: int  # enough for any reference answer

    def examples(self, split: str, n: int | None = None) -> list[Example]: ...

    def score(self, example: Example, completion: str) -> float: ...


def chat_prompt(tokenizer, example: Example) -> str:
    """The prompt text after the model's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}], tokenize=False, add_generation_prompt=True
    )


_FENCE = re.compile(r"```[a-zA-Z]*\n?(.*?)(?:```|$)", re.DOTALL)


def strip_fences(completion: str) -> str:
    """The answer inside a Markdown code fence if there is one, else the text itself, stripped."""
    m = _FENCE.search(completion)
    return (m.group(1) if m else completion).strip()


class PooledSkill:
    """A skill whose examples come from ``draw(rng)``: a seeded pool of distinct prompts.

    The pool is drawn once with ``random.Random(seed)``; its first ``HELDOUT_SIZE`` examples are
    the held-out split and the rest the train split, so the splits never share a prompt.
    """

    name: str
    max_new_tokens: int
    seed: int
    pool_size: int

    def draw(self, rng: random.Random) -> Example:
        raise NotImplementedError

    @cached_property
    def _pool(self) -> list[Example]:
        rng = random.Random(self.seed)
        seen: dict[str, Example] = {}
        for _ in range(self.pool_size * 50):  # bounded: templates with few combinations stop early
            ex = self.draw(rng)
            seen.setdefault(ex.prompt, ex)
            if len(seen) == self.pool_size:
                break
        if len(seen) < 2 * HELDOUT_SIZE:
            raise ValueError(f"skill {self.name!r} drew only {len(seen)} distinct prompts")
        return list(seen.values())

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        """The first ``n`` examples of ``split`` ("train" or "heldout"), all of it if n is None."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        part = self._pool[:HELDOUT_SIZE] if split == "heldout" else self._pool[HELDOUT_SIZE:]
        return part if n is None else part[:n]
