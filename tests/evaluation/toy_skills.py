"""Toy skills for the tiny random model, standing in for ``hotmerge.skills`` in these tests.

The tiny model writes random bytes, so the toy scores are arbitrary but deterministic functions
of the completion: they differ between adapters and merges, which is all a sweep needs to rank.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    prompt: str
    reference: str


class ToySkill:
    max_new_tokens = 4

    def __init__(self, name: str, modulus: int) -> None:
        self.name, self.modulus = name, modulus

    def examples(self, split: str, n: int | None = None) -> list[Example]:
        assert split in ("train", "heldout")
        offset = 0 if split == "train" else 1000
        items = [Example(f"{self.name} item {offset + i}:", f" answer {i % 7}") for i in range(50)]
        return items[:n] if n is not None else items

    def score(self, example: Example, completion: str) -> float:
        if not completion:
            return 0.0
        shift = int(example.reference[-1])  # so the examples of one target score differently
        return float((sum(map(ord, completion)) + shift) % self.modulus == 0)


SKILLS = {s.name: s for s in (ToySkill("even", 2), ToySkill("third", 3))}


def chat_prompt(tokenizer, example: Example) -> str:
    """As hotmerge.skills renders it: the tokenizer's chat template, ready for the answer."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}], tokenize=False, add_generation_prompt=True
    )


def install(monkeypatch) -> types.ModuleType:
    """Make ``hotmerge.skills`` this module's toy skills for the test."""
    module = types.ModuleType("hotmerge.skills")
    module.SKILLS, module.chat_prompt, module.Example = SKILLS, chat_prompt, Example
    monkeypatch.setitem(sys.modules, "hotmerge.skills", module)
    return module
