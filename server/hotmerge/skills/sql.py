"""English questions to SQLite queries over a fixed two-table schema, scored by execution."""

from __future__ import annotations

import random
import re
import sqlite3

from hotmerge.skills.base import Example, PooledSkill, strip_fences

SCHEMA = "users(id, name, age, city), orders(id, user_id, product, amount)"
CITIES = ("Paris", "Berlin", "Lisbon", "Madrid", "Rome", "Vienna", "Oslo", "Dublin", "Prague",
          "Athens", "Warsaw", "Zurich")  # fmt: skip
NAMES = ("Alice", "Bruno", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Julia",
         "Kofi", "Lena", "Marco", "Nina", "Omar", "Petra", "Quinn", "Rosa", "Sven", "Tara",
         "Umar", "Vera", "Wei", "Xena", "Yusuf", "Zoe")  # fmt: skip
PRODUCTS = ("laptop", "phone", "desk", "chair", "lamp", "monitor", "keyboard", "mouse")
N_USERS = 200
_JOIN = "FROM orders JOIN users ON orders.user_id = users.id"

# (question, query); fields: {city}, {name}, {product}, {age} (18..75), {amount} (multiple of 10)
TEMPLATES = (
    ("How many users live in {city}?", "SELECT COUNT(*) FROM users WHERE city = '{city}';"),
    ("List the names of users older than {age}.", "SELECT name FROM users WHERE age > {age};"),
    (
        "List the names of users younger than {age} who live in {city}.",
        "SELECT name FROM users WHERE age < {age} AND city = '{city}';",
    ),
    (
        "List the names of users in {city} older than {age}, sorted by age.",
        "SELECT name FROM users WHERE city = '{city}' AND age > {age} ORDER BY age;",
    ),
    (
        "What is the average age of users in {city}?",
        "SELECT AVG(age) FROM users WHERE city = '{city}';",
    ),
    (
        "What is the age of the oldest user in {city}?",
        "SELECT MAX(age) FROM users WHERE city = '{city}';",
    ),
    (
        "What is the total amount of {product} orders?",
        "SELECT SUM(amount) FROM orders WHERE product = '{product}';",
    ),
    (
        "What is the largest amount of a {product} order?",
        "SELECT MAX(amount) FROM orders WHERE product = '{product}';",
    ),
    (
        "How many orders have an amount above {amount}?",
        "SELECT COUNT(*) FROM orders WHERE amount > {amount};",
    ),
    (
        "List the products ordered by {name}.",
        f"SELECT orders.product {_JOIN} WHERE users.name = '{{name}}';",
    ),
    (
        "How many orders did users from {city} place?",
        f"SELECT COUNT(*) {_JOIN} WHERE users.city = '{{city}}';",
    ),
    (
        "List the names of users who ordered a {product} for more than {amount}.",
        f"SELECT users.name {_JOIN} "
        "WHERE orders.product = '{product}' AND orders.amount > {amount};",
    ),
)


def build_db() -> sqlite3.Connection:
    """The fixed database every query runs against (seeded; read-only once built)."""
    rng = random.Random(7)
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, age INTEGER, city TEXT)")
    db.execute(
        "CREATE TABLE orders "
        "(id INTEGER PRIMARY KEY, user_id INTEGER, product TEXT, amount INTEGER)"
    )
    for i in range(1, N_USERS + 1):
        row = (i, rng.choice(NAMES), rng.randint(18, 75), rng.choice(CITIES))
        db.execute("INSERT INTO users VALUES (?, ?, ?, ?)", row)
    for i in range(1, 3 * N_USERS + 1):
        row = (i, rng.randint(1, N_USERS), rng.choice(PRODUCTS), rng.randrange(10, 1001, 10))
        db.execute("INSERT INTO orders VALUES (?, ?, ?, ?)", row)
    db.commit()
    db.execute("PRAGMA query_only = ON")
    return db


_LITERAL = re.compile(r"'[^']*'|\b\d+\b")


def _normalise(query: str) -> str:
    return " ".join(query.replace(";", " ").split()).lower()


def _run(db: sqlite3.Connection, query: str) -> list[tuple] | None:
    """The query's rows (floats rounded), or None if it fails or runs away."""
    steps = 0

    def budget() -> int:
        nonlocal steps
        steps += 1
        return steps > 20_000  # x1000 VM instructions; a cross join of these tables is ~1/10 of it

    db.set_progress_handler(budget, 1000)
    try:
        rows = db.execute(query).fetchall()
    except (sqlite3.Error, sqlite3.Warning, ValueError):
        return None
    finally:
        db.set_progress_handler(None, 0)
    return [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows]


class SqlSkill(PooledSkill):
    name = "sql"
    max_new_tokens = 64
    seed = 11
    pool_size = 2350  # every distinct prompt of the templates: 301 held-out, 2049 train

    def draw(self, rng: random.Random) -> Example:
        question, query = rng.choice(TEMPLATES)
        fields = dict(
            city=rng.choice(CITIES),
            name=rng.choice(NAMES),
            product=rng.choice(PRODUCTS),
            age=rng.randint(18, 75),
            amount=rng.randrange(100, 1000, 10),
        )
        prompt = f"Tables: {SCHEMA}. Write one SQLite query: {question.format(**fields)}"
        return Example(prompt, query.format(**fields))

    def stratum(self, example: Example) -> str:
        """The query's shape (its template): literals masked."""
        return _LITERAL.sub("?", example.reference)

    def score(self, example: Example, completion: str) -> float:
        """1.0 when the completion's rows equal the reference's (in order only if it orders)."""
        query = strip_fences(completion)
        if not query:
            return 0.0
        db = build_db()  # fresh per call: no shared state across threads
        try:
            want, got = _run(db, example.reference), _run(db, query)
        finally:
            db.close()
        if got is None or want is None:
            return 0.0
        if not any(v not in (None, 0) for row in want for v in row):
            # an empty (or zero) result is too easy to hit by accident: ask for the query itself
            return float(_normalise(query) == _normalise(example.reference))
        if "ORDER BY" not in example.reference.upper():
            want, got = sorted(want, key=repr), sorted(got, key=repr)
        return float(want == got)
