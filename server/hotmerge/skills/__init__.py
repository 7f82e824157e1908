"""Skills the base model lacks: seeded task generators with exact scoring, for training and eval.

Each skill draws a pool of distinct prompts from templates with a fixed seed; the held-out and
train splits are disjoint parts of it, the held-out one stratified (sql by query shape, so
that every kind of question is trained on; see base.PooledSkill). Scoring is exact: SQL by executing
against a fixed in-memory sqlite database, JSON by comparing parsed objects, Python by running
test cases in a subprocess with a time limit.
"""

from __future__ import annotations

from hotmerge.skills.base import HELDOUT_SIZE, Example, Skill, chat_prompt
from hotmerge.skills.json_fields import JsonSkill
from hotmerge.skills.python_funcs import PythonSkill
from hotmerge.skills.sql import SqlSkill

SKILLS: dict[str, Skill] = {s.name: s for s in (SqlSkill(), JsonSkill(), PythonSkill())}

__all__ = ["HELDOUT_SIZE", "SKILLS", "Example", "Skill", "chat_prompt"]
