"""Score one target (the base model, an adapter or named merge, an inline merge spec) on skills'
held-out examples through a running server.

Per example, two requests over gRPC, sent concurrently so the engine batches them:

- a greedy generation of the skill's ``max_new_tokens``, scored by ``Skill.score`` (exact match
  or execution): the skill's **score** is the mean;
- unless turned off, the prompt followed by the reference answer with ``prompt_logprobs``:
  the mean logprob of the reference tokens, averaged over examples, is the skill's **loglik**
  (a smooth signal where the score saturates or is all zeros).

Prompts go as token ids, rendered client-side: the skill's chat template (``chat_prompt``, as
the server's OpenAI chat route renders it, tokenized without special tokens) or the raw prompt
(tokenized as the server tokenizes text). The reference follows the prompt's ids, tokenized on
its own, so exactly its tokens are scored.

The first request runs alone: it shows a bad target (an unknown adapter, a spec the server
refuses) before hundreds more are sent, and its merge timing is the merge itself, not a wait.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import grpc

from hotmerge.client import HotmergeClient

# Status codes that the same request gets again on a retry: the target itself is wrong.
PERMANENT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


class Example(Protocol):
    prompt: str
    reference: str


class Skill(Protocol):
    """What ``hotmerge.skills`` provides (any object with these members will do)."""

    name: str
    max_new_tokens: int

    def examples(self, split: str, n: int | None = None) -> list[Any]: ...

    def score(self, example: Any, completion: str) -> float: ...


@dataclass(frozen=True)
class Target:
    """What generates: the base model (neither field), an adapter id or named merge, or an
    inline merge spec (fields of MergedAdapters)."""

    adapter_id: str | None = None
    spec: Mapping[str, Any] | None = None

    def options(self) -> dict[str, Any]:
        if self.spec is not None:
            return {"merged_adapters": dict(self.spec)}
        return {"adapter_id": self.adapter_id} if self.adapter_id else {}


@dataclass(frozen=True)
class EvalSettings:
    n: int | None = None  # examples per skill; None: the whole held-out set
    split: str = "heldout"
    max_new_tokens: int | None = None  # None: each skill's own
    loglik: bool = True  # also score the reference's log-likelihood
    score_new_tokens: int = 1  # tokens a scoring request generates (0 where the server allows)
    concurrency: int = 16
    timeout_s: float = 300.0


class Prompter:
    """Token ids of a skill example's prompt and reference, for one tokenizer."""

    def __init__(self, tokenizer, template: Callable[[Any, Any], str] | None) -> None:
        self.tokenizer = tokenizer
        self.template = template  # chat_prompt(tokenizer, example); None: the raw prompt

    def prompt_ids(self, example: Example) -> list[int]:
        if self.template is None:
            return list(self.tokenizer(example.prompt)["input_ids"])
        text = self.template(self.tokenizer, example)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def reference_ids(self, example: Example) -> list[int]:
        return list(self.tokenizer(example.reference, add_special_tokens=False)["input_ids"])


class EvalError(Exception):
    """A request of the evaluation failed; ``permanent``: retrying gives the same error."""

    def __init__(self, code: str, details: str, permanent: bool) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details, self.permanent = code, details, permanent


@dataclass
class ExampleResult:
    skill: str
    index: int
    completion: str = ""
    score: float = 0.0
    loglik: float | None = None  # mean logprob of the reference tokens
    prompt_tokens: int = 0
    reference_tokens: int = 0


@dataclass
class SkillResult:
    n: int
    score: float
    loglik: float | None


@dataclass
class EvalResult:
    skills: dict[str, SkillResult]
    examples: list[ExampleResult] = field(default_factory=list)
    merge_ms: float = 0.0  # how long the target's merge took (0: no merge)
    merge_cache_hit: bool | None = None  # None: no merge
    merge_key: str = ""
    wall_s: float = 0.0
    requests: int = 0

    def summary(self) -> dict[str, Any]:
        """Everything but the per-example results."""
        out = asdict(self)
        out.pop("examples")
        return out


@dataclass(frozen=True)
class _Job:
    example: ExampleResult
    kind: str  # "generate" | "loglik"
    input_ids: list[int]
    options: dict[str, Any]
    skill: Skill
    source: Any  # the skill's Example
    prompt_len: int = 0


def probe_score_tokens(client: HotmergeClient, timeout_s: float = 60.0) -> int:
    """0 when the server scores a prompt without generating (``max_new_tokens: 0``), else 1."""
    try:
        client.generate("a", max_new_tokens=0, timeout=timeout_s)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens" in (
            err.details() or ""
        ):
            return 1
        raise
    return 0


def load_examples(skills: Sequence[Skill], settings: EvalSettings) -> dict[str, list[Any]]:
    return {s.name: list(s.examples(settings.split, settings.n)) for s in skills}


def _jobs(
    skills: Sequence[Skill],
    examples: Mapping[str, Sequence[Any]],
    prompter: Prompter,
    settings: EvalSettings,
) -> tuple[list[_Job], list[ExampleResult]]:
    jobs, results = [], []
    for skill in skills:
        new_tokens = settings.max_new_tokens or skill.max_new_tokens
        for i, ex in enumerate(examples[skill.name]):
            result = ExampleResult(skill.name, i)
            results.append(result)
            prompt = prompter.prompt_ids(ex)
            greedy = {"max_new_tokens": new_tokens}
            jobs.append(_Job(result, "generate", prompt, greedy, skill, ex))
            if settings.loglik:
                reference = prompter.reference_ids(ex)
                scoring = {"max_new_tokens": settings.score_new_tokens, "prompt_logprobs": True}
                jobs.append(
                    _Job(result, "loglik", prompt + reference, scoring, skill, ex, len(prompt))
                )
    return jobs, results


def _run(client: HotmergeClient, job: _Job, target: Target, timeout_s: float):
    try:
        reply = client.generate(job.input_ids, timeout=timeout_s, **target.options(), **job.options)
    except grpc.RpcError as err:
        code = err.code()
        raise EvalError(code.name, err.details() or "", code in PERMANENT_CODES) from None
    ex = job.example
    if job.kind == "generate":
        ex.completion = reply.generated_text
        ex.prompt_tokens = reply.prompt_tokens
        ex.score = float(job.skill.score(job.source, reply.generated_text))
    else:
        logprobs = [t.logprob for t in reply.prompt[job.prompt_len :]]
        ex.reference_tokens = len(logprobs)
        ex.loglik = sum(logprobs) / len(logprobs) if logprobs else math.nan
    return reply


def evaluate(
    client: HotmergeClient,
    target: Target,
    skills: Sequence[Skill],
    examples: Mapping[str, Sequence[Any]],
    prompter: Prompter,
    settings: EvalSettings,
    *,
    label: str = "",
    progress: bool = True,
) -> EvalResult:
    """Score ``target`` on each skill's ``examples``; raises EvalError on the first failed
    request (the rest are cancelled)."""
    from tqdm.auto import tqdm

    jobs, results = _jobs(skills, examples, prompter, settings)
    # The lone first request is a short scoring one where there is one: it only prefills.
    lead = next((i for i, j in enumerate(jobs) if j.kind == "loglik"), None)
    if lead is not None:
        jobs.insert(0, jobs.pop(lead))
    started = time.monotonic()
    bar = tqdm(total=len(jobs), desc=label or "eval", unit="req", disable=not progress,
               leave=False)  # fmt: skip
    try:
        first = _run(client, jobs[0], target, settings.timeout_s) if jobs else None
        bar.update(1)
        with ThreadPoolExecutor(max(1, settings.concurrency)) as pool:
            futures = [pool.submit(_run, client, j, target, settings.timeout_s) for j in jobs[1:]]
            for f in futures:
                f.add_done_callback(lambda _f: bar.update(1))
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:
                f.cancel()
            for f in done:
                if f.exception() is not None:
                    raise f.exception()
    finally:
        bar.close()
    out = EvalResult(
        skills={}, examples=results, wall_s=time.monotonic() - started, requests=len(jobs)
    )
    for skill in skills:
        mine = [r for r in results if r.skill == skill.name]
        logliks = [r.loglik for r in mine if r.loglik is not None and math.isfinite(r.loglik)]
        out.skills[skill.name] = SkillResult(
            n=len(mine),
            score=sum(r.score for r in mine) / len(mine) if mine else math.nan,
            loglik=sum(logliks) / len(logliks) if logliks else None,
        )
    if first is not None and first.HasField("merge"):
        out.merge_ms = first.timings.merge_ms
        out.merge_cache_hit = first.merge.cache_hit
        out.merge_key = first.merge.merge_key
        if out.merge_cache_hit:  # merged before this evaluation: the cache recorded how long
            entries = client.list_merges(timeout=settings.timeout_s).merges
            out.merge_ms = next(
                (e.merge_ms for e in entries if e.merge_key == out.merge_key), out.merge_ms
            )
    return out
