"""Short Python functions from a one-line spec, scored by running test cases in a subprocess."""

from __future__ import annotations

import json
import random
import secrets
import subprocess
import sys

from hotmerge.skills.base import Example, PooledSkill, strip_fences

VERBS = ("compute", "get", "find", "make", "build", "calc", "select", "pick", "take", "produce")
NOUNS = ("result", "values", "answer", "output", "items", "total", "data", "stuff")
# Inputs that tell neighbouring answers apart: every k in 2..9 occurs in a list, every length
# from 0 to 11 among the strings.
LIST_INPUTS = ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [10, 3, 7, 8, 2, 12], [0, 9, 12, 5, 15, 4, 18],
               [-3, 4, 6, 6, 27, 16])  # fmt: skip
STR_INPUTS = ("hello world", "abcdefghijklmn", "python", "a", "", "ab", "abc", "abcd", "xyzzy",
              "seven77", "eight888", "nine99999", "ten_chars!")  # fmt: skip
TIME_LIMIT_S = 5.0

# A spec is a filter of xs and what to return of the kept elements, or a string operation;
# {k} and {m} are integers 2..9.
FILTERS = (
    ("greater than {k}", "x > {k}"),
    ("less than {k}", "x < {k}"),
    ("at least {k}", "x >= {k}"),
    ("divisible by {k}", "x % {k} == 0"),
    ("not divisible by {k}", "x % {k} != 0"),
)
LIST_RESULTS = (
    ("the sum of the elements of xs that are {f}", "sum(x for x in xs if {c})"),
    ("how many elements of xs are {f}", "len([x for x in xs if {c}])"),
    ("the elements of xs that are {f}, each multiplied by {m}", "[x * {m} for x in xs if {c}]"),
    ("the elements of xs that are {f}, each plus {m}", "[x + {m} for x in xs if {c}]"),
    (
        "the elements of xs that are {f}, sorted in descending order",
        "sorted((x for x in xs if {c}), reverse=True)",
    ),
)
STR_OPS = (
    ("the first {k} characters of s repeated {m} times", "s[:{k}] * {m}"),
    ("the last {k} characters of s in upper case", "s[-{k}:].upper()"),
    ("s without its first {k} characters, reversed", "s[{k}:][::-1]"),
)
OPS = tuple(
    ("xs", spec.replace("{f}", f), body.replace("{c}", c))
    for spec, body in LIST_RESULTS
    for f, c in FILTERS
) + tuple(("s", spec, body) for spec, body in STR_OPS)

# Runs in a fresh interpreter: defines both functions, calls each on the inputs, and prints the
# job's nonce only if they agree (a completion that prints and exits cannot pass by itself).
_CHECK = """
import json, sys
job = json.load(sys.stdin)
ns_want, ns_got = {}, {}
exec(job["reference"], ns_want)
try:
    exec(job["candidate"], ns_got)
    fn = ns_got[job["fn"]]
    ok = all(repr(fn(a)) == repr(ns_want[job["fn"]](a)) for a in job["inputs"])
except BaseException:
    ok = False
print(job["nonce"] if ok else 0)
"""


class PythonSkill(PooledSkill):
    name = "python"
    max_new_tokens = 48
    seed = 33
    pool_size = 3000

    def draw(self, rng: random.Random) -> Example:
        arg, spec, body = rng.choice(OPS)
        k, m = rng.randint(2, 9), rng.randint(2, 9)
        fn = f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}"
        prompt = f"Write a Python function {fn}({arg}) that returns {spec.format(k=k, m=m)}."
        return Example(prompt, f"def {fn}({arg}):\n    return {body.format(k=k, m=m)}")

    def score(self, example: Example, completion: str) -> float:
        """1.0 when the completion's function agrees with the reference on every test input."""
        code = strip_fences(completion)
        if code == example.reference:
            return 1.0  # identical source: same behaviour, no interpreter needed
        fn = example.reference.split("(", 1)[0].removeprefix("def ")
        inputs = LIST_INPUTS if f"{fn}(xs)" in example.reference else STR_INPUTS
        nonce = secrets.token_hex(8)
        job = dict(reference=example.reference, candidate=code, fn=fn, inputs=inputs, nonce=nonce)
        try:
            out = subprocess.run(
                [sys.executable, "-I", "-S", "-c", _CHECK],
                input=json.dumps(job), capture_output=True, text=True, timeout=TIME_LIMIT_S,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return 0.0
        return float(out.stdout.strip() == nonce)
