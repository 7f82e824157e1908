"""The skill interface and the seeded pool that splits a skill's prompts into train and held-out."""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Hashable
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

    The pool is drawn once with ``random.Random(seed)`` and split so that the splits never
    share a prompt. The held-out split takes, from each stratum (``stratum(example)``; the whole
    pool is one unless a skill says otherwise), its first examples in pool order, in proportion
    to the stratum's size (at least one of a stratum of two or more): about ``HELDOUT_SIZE`` in
    all. The rest is the train split. Strata keep a kind of question that has few distinct
    prompts from landing wholly in the held-out split, never trained on.
    """

    name: str
    max_new_tokens: int
    seed: int
    pool_size: int

    def draw(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def stratum(self, example: Example) -> Hashable:
        return None

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

    @cached_property
    def _splits(self) -> dict[str, list[Example]]:
        pool = self._pool
        strata = [self.stratum(ex) for ex in pool]
        sizes = Counter(strata)
        quota = {
            s: max(round(n * HELDOUT_SIZE / len(pool)), 1 if n >= 2 else 0)
            for s, n in sizes.items()
        }
        taken: Counter = Counter()
        splits: dict[str, list[Example]] = {"heldout": [], "train": []}
        for ex, s in zip(pool, strata, strict=True):
            split = "heldout" if taken[s] < quota[s] else "train"
            taken[s] += split == "heldout"
            splits[split].append(ex)
        return splits

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        """The first ``n`` examples of ``split`` ("train" or "heldout"), all of it if n is None."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        part = self._splits[split]
        return part if n is None else part[:n]
