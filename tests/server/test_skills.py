"""The skill generators and their scoring (CPU, no model)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hotmerge.skills import HELDOUT_SIZE, SKILLS, Example, chat_prompt
from hotmerge.skills.base import strip_fences
from hotmerge.skills.json_fields import JsonSkill
from hotmerge.skills.python_funcs import PythonSkill
from hotmerge.skills.sql import SqlSkill, build_db


def test_registry_names_the_three_skills():
    assert set(SKILLS) == {"sql", "json", "python"}
    assert all(SKILLS[name].name == name for name in SKILLS)


@pytest.mark.parametrize("name", sorted(SKILLS))
def test_splits_are_deterministic_disjoint_and_large_enough(name):
    skill = SKILLS[name]
    fresh = type(skill)()  # a new instance draws its pool again from the seed
    heldout, train = fresh.examples("heldout"), fresh.examples("train")
    assert heldout == skill.examples("heldout") and train == skill.examples("train")
    assert abs(len(heldout) - HELDOUT_SIZE) <= 5 and len(heldout) >= 200  # strata round
    assert len(train) >= 1000
    prompts_h, prompts_t = {e.prompt for e in heldout}, {e.prompt for e in train}
    assert len(prompts_h) == len(heldout) and len(prompts_t) == len(train)  # no duplicates
    assert not prompts_h & prompts_t
    assert skill.examples("heldout", 5) == heldout[:5]
    with pytest.raises(ValueError, match="split"):
        skill.examples("test")
    # every stratum (sql: every query shape) of two or more prompts is in both splits
    strata = {skill.stratum(e) for e in heldout}
    sizes = Counter(skill.stratum(e) for e in heldout + train)
    assert strata == {s for s, n in sizes.items() if n >= 2}
    assert strata <= {skill.stratum(e) for e in train}


@pytest.mark.parametrize("name", sorted(SKILLS))
def test_every_reference_scores_one(name):
    skill = SKILLS[name]
    examples = skill.examples("heldout") + skill.examples("train")[:100]
    assert all(skill.score(e, e.reference) == 1.0 for e in examples)
    assert all(
        len(e.prompt) < 300 and len(e.reference) < 4 * skill.max_new_tokens for e in examples
    )


def test_sql_scores_by_execution():
    skill = SqlSkill()
    ex = Example(
        "How many users live in Paris?", "SELECT COUNT(*) FROM users WHERE city = 'Paris';"
    )
    assert skill.score(ex, "select count(id) from users where city='Paris'") == 1.0  # same rows
    assert skill.score(ex, "```sql\nSELECT COUNT(*) FROM users WHERE city = 'Paris'\n```") == 1.0
    assert skill.score(ex, "SELECT COUNT(*) FROM users WHERE city = 'Rome';") == 0.0
    assert skill.score(ex, "SELECT COUNT(*) FROM users;") == 0.0
    assert skill.score(ex, "SELECT * FROM users WHERE id NOT IN (1)") == 0.0
    assert skill.score(ex, "Sure! Here is the query.") == 0.0
    assert skill.score(ex, "") == 0.0
    assert skill.score(ex, "DROP TABLE users;") == 0.0  # the database is read-only
    assert skill.score(ex, ex.reference) == 1.0


def test_sql_order_matters_only_when_the_reference_orders():
    skill = SqlSkill()
    ordered = Example("q", "SELECT name FROM users WHERE city = 'Rome' AND age > 20 ORDER BY age;")
    assert (
        skill.score(ordered, ordered.reference.replace("ORDER BY age", "ORDER BY age DESC")) == 0.0
    )
    unordered = Example("q", "SELECT name FROM users WHERE city = 'Rome' AND age > 20;")
    assert skill.score(unordered, unordered.reference[:-1] + " ORDER BY name DESC;") == 1.0


def test_sql_empty_result_needs_the_query_itself():
    db = build_db()
    (max_age,) = db.execute("SELECT MAX(age) FROM users").fetchone()
    ex = Example("q", f"SELECT name FROM users WHERE age > {max_age};")  # no rows
    assert SqlSkill().score(ex, "SELECT name FROM users WHERE age > 1000;") == 0.0
    assert SqlSkill().score(ex, f"select name from users where age > {max_age}") == 1.0


def test_json_compares_parsed_objects():
    skill = JsonSkill()
    ex = Example("p", json.dumps({"name": "Maria", "age": 34, "city": "Lisbon"}))
    assert skill.score(ex, '{"city": "Lisbon", "name": "Maria", "age": 34}') == 1.0  # any key order
    assert skill.score(ex, '```json\n{"name":"Maria","age":34,"city":"Lisbon"}\n```') == 1.0
    assert skill.score(ex, '{"name": "Maria", "age": "34", "city": "Lisbon"}') == 0.0  # a string
    assert skill.score(ex, '{"name": "Maria", "age": 34}') == 0.0
    assert skill.score(ex, '{"name": "Maria", "age": 34, "city": "Lisbon", "x": 1}') == 0.0
    assert skill.score(ex, '{"name": "Maria", "age": 34, "city": "Lisbon"') == 0.0  # unclosed
    assert skill.score(ex, "Maria is 34 and lives in Lisbon.") == 0.0


def test_python_runs_the_test_cases():
    skill = PythonSkill()
    ex = Example("p", "def get_total(xs):\n    return sum(x for x in xs if x > 4)")
    assert skill.score(ex, "def get_total(xs):\n    return sum([v for v in xs if v >= 5])") == 1.0
    assert skill.score(ex, "```python\n" + ex.reference + "\n```") == 1.0
    assert skill.score(ex, "def get_total(xs):\n    return sum(x for x in xs if x > 3)") == 0.0
    assert skill.score(ex, "def other(xs):\n    return sum(x for x in xs if x > 4)") == 0.0
    assert skill.score(ex, "def get_total(xs):\n    return sum(x for x in xs if x > 4") == 0.0
    assert skill.score(ex, "def get_total(xs):\n    raise SystemExit(0)") == 0.0
    assert skill.score(ex, "import os\nprint(1)\nos._exit(0)") == 0.0  # no passing by printing
    s = Example("p", "def take_data(s):\n    return s[:3]")
    assert skill.score(s, "def take_data(s):\n    return s[0:3]") == 1.0
    assert skill.score(s, "def take_data(s):\n    return s[:4]") == 0.0


def test_python_time_limit(monkeypatch):
    monkeypatch.setattr("hotmerge.skills.python_funcs.TIME_LIMIT_S", 1.0)
    ex = Example("p", "def get_total(xs):\n    return max(xs) + 2")
    assert PythonSkill().score(ex, "def get_total(xs):\n    while True:\n        pass") == 0.0


def test_strip_fences():
    assert strip_fences("  SELECT 1; ") == "SELECT 1;"
    assert strip_fences("Here:\n```sql\nSELECT 1;\n```\nDone") == "SELECT 1;"
    assert strip_fences("```\nx\n") == "x"  # an unclosed fence (generation cut short)


def test_chat_prompt_uses_the_template():
    class Tok:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return f"<user>{messages[0]['content']}</user><assistant>"

    assert chat_prompt(Tok(), Example("hi", "x")) == "<user>hi</user><assistant>"
