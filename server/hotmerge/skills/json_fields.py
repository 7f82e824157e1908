"""Sentences to JSON records of a fixed schema, scored by comparing the parsed objects.

The prompt names no keys: the schema (a "type" tag and its fields) is what the skill learns.
"""

from __future__ import annotations

import json
import random

from hotmerge.skills.base import Example, PooledSkill, strip_fences

NAMES = ("Maria", "John", "Aisha", "Kenji", "Lucas", "Sofia", "Ahmed", "Elena", "Tom", "Priya",
         "Diego", "Mei", "Olga", "Samuel", "Ines", "Noah", "Leila", "Pavel", "Grace",
         "Tariq")  # fmt: skip
CITIES = ("Lisbon", "Boston", "Cairo", "Osaka", "Lima", "Denver", "Nairobi", "Seoul", "Porto",
          "Dallas", "Krakow", "Hanoi", "Quito", "Perth", "Turin")  # fmt: skip
JOBS = ("teacher", "nurse", "pilot", "baker", "lawyer", "chef", "plumber", "designer", "farmer",
        "dentist", "writer", "engineer")  # fmt: skip
ITEMS = ("apples", "pencils", "candles", "batteries", "towels", "notebooks", "cables", "bottles",
         "lamps", "tiles")  # fmt: skip

# (record type, keys, sentence templates); each key is filled from the field of the same name
FRAMES = (
    (
        "person",
        ("name", "age", "city"),
        (
            "{name} is {age} years old and lives in {city}.",
            "Living in {city}, {name} turned {age} this year.",
            "{name}, aged {age}, moved to {city} last spring.",
            "At {age}, {name} still calls {city} home.",
        ),
    ),
    (
        "worker",
        ("name", "job", "city"),
        (
            "{name} works as a {job} in {city}.",
            "In {city}, {name} earns a living as a {job}.",
            "{name} is a {job} who commutes to {city} every day.",
        ),
    ),
    (
        "order",
        ("item", "quantity", "unit_price"),
        (
            "Please send {quantity} {item} at {unit_price} dollars each.",
            "We need {quantity} {item}, priced at {unit_price} dollars apiece.",
            "The order is {quantity} {item} for {unit_price} dollars per unit.",
        ),
    ),
)


class JsonSkill(PooledSkill):
    name = "json"
    max_new_tokens = 48
    seed = 22
    pool_size = 3000

    def draw(self, rng: random.Random) -> Example:
        kind, keys, sentences = rng.choice(FRAMES)
        fields = dict(
            name=rng.choice(NAMES),
            age=rng.randint(18, 90),
            city=rng.choice(CITIES),
            job=rng.choice(JOBS),
            item=rng.choice(ITEMS),
            quantity=rng.randint(2, 99),
            unit_price=rng.randint(1, 500),
        )
        text = rng.choice(sentences).format(**fields)
        record = {"type": kind} | {k: fields[k] for k in keys}
        return Example(f"Extract the record as JSON: {text}", json.dumps(record))

    def score(self, example: Example, completion: str) -> float:
        """1.0 when the completion parses to the reference object exactly (key order aside)."""
        try:
            got = json.loads(strip_fences(completion))
        except ValueError:
            return 0.0
        return float(got == json.loads(example.reference))
