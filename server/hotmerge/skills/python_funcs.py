"""Short Python functions from a one-line spec, scored by running test cases in a subprocess."""

from __future__ import annotations

import json
import random
import subprocess
import sys

from hotmerge.skills.base import Example, PooledSkill, strip_fences

VERBS = ("compute", "get", "find", "make", "build", "calc", "select", "pick", "take", "produce")
NOUNS = ("result", "values", "answer", "output", "items", "total", "data", "stuff")
LIST_INPUTS = ([1, 2, 3, 4, 5, 6], [10, 3, 7, 8, 2], [0, 9, 12, 5, 15, 4], [-3, 4, 6, 6])
STR_INPUTS = ("hello world", "abcdefghijklmn", "python", "a")
TIME_LIMIT_S = 5.0

# (argument, spec, body); {k} is an integer 2..9
OPS = (
    ("xs", "the sum of the elements of xs greater than {k}", "sum(x for x in xs if x > {k})"),
    ("xs", "how many times {k} appears in xs", "xs.count({k})"),
    ("xs", "a list of the elements of xs multiplied by {k}", "[x * {k} for x in xs]"),
    ("xs", "a list of the elements of xs divisible by {k}", "[x for x in xs if x % {k} == 0]"),
    ("xs", "the largest element of xs plus {k}", "max(xs) + {k}"),
    ("xs", "a list of the elements of xs less than {k}", "[x for x in xs if x < {k}]"),
    ("s", "s repeated {k} times", "s * {k}"),
    ("s", "the first {k} characters of s", "s[:{k}]"),
    ("s", "s without its last {k} characters", "s[:-{k}]"),
    ("s", "True if s is longer than {k} characters", "len(s) > {k}"),
)

# Runs in a fresh interpreter: defines both functions, calls each on the inputs, prints 1 or 0.
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
print(1 if ok else 0)
"""


class PythonSkill(PooledSkill):
    name = "python"
    max_new_tokens = 48
    seed = 33
    pool_size = 3000

    def draw(self, rng: random.Random) -> Example:
        arg, spec, body = rng.choice(OPS)
        k = rng.randint(2, 9)
        fn = f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}"
        prompt = f"Write a Python function {fn}({arg}) that returns {spec.format(k=k)}."
        return Example(prompt, f"def {fn}({arg}):\n    return {body.format(k=k)}")

    def score(self, example: Example, completion: str) -> float:
        """1.0 when the completion's function agrees with the reference on every test input."""
        code = strip_fences(completion)
        if code == example.reference:
            return 1.0  # identical source: same behaviour, no interpreter needed
        fn = example.reference.split("(", 1)[0].removeprefix("def ")
        inputs = LIST_INPUTS if f"{fn}(xs)" in example.reference else STR_INPUTS
        job = json.dumps(dict(reference=example.reference, candidate=code, fn=fn, inputs=inputs))
        try:
            out = subprocess.run(
                [sys.executable, "-I", "-S", "-c", _CHECK],
                input=job, capture_output=True, text=True, timeout=TIME_LIMIT_S,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return 0.0
        return float(out.stdout.strip() == "1")
