"""The static way to score one merge candidate, timed: what a sweep costs without hotmerge.

PEFT ``add_weighted_adapter`` over the loaded adapters, ``save_pretrained`` of the merged
adapter, a fresh base model with it reloaded (``PeftModel.from_pretrained``), then the same
evaluation as ``hotmerge eval`` (same prompts, greedy generation scored by the skill, reference
log-likelihood) with transformers' ``generate`` in batches. Prints one JSON object: each
step's seconds and the scores, to set beside ``hotmerge sweep``'s time per candidate.

    python benchmarks/static_merge_baseline.py --model data/smollm2 --adapter-root data/adapters \
        --spec '{"ids": ["sql", "python"], "merge_strategy": "ties", "density": 0.5}' \
        --skills sql,python -n 200 --device cuda --dtype bfloat16

DARE's drop mask is PEFT's own (torch.bernoulli), not hotmerge's seeded stream: DARE scores
differ in their randomness, the time does not. slerp is not a PEFT combination.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hotmerge.evaluation.eval import Prompter


def _timed(times: dict[str, float], name: str, fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times[name] = round(time.perf_counter() - start, 4)
    return out


def _load_base(model_dir: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def merge_and_reload(spec: dict[str, Any], model_dir: str, adapter_root: Path, device: str,
                     dtype: torch.dtype, times: dict[str, float]):  # fmt: skip
    """PEFT's merge of ``spec``, saved and reloaded onto a fresh base: the model to evaluate."""
    from peft import PeftModel

    ids = list(spec["ids"])
    weights = list(spec.get("weights") or [1.0] * len(ids))

    def load():
        model = PeftModel.from_pretrained(
            _load_base(model_dir, device, dtype), adapter_root / ids[0], adapter_name=ids[0]
        )
        for adapter_id in ids[1:]:
            model.load_adapter(adapter_root / adapter_id, adapter_name=adapter_id)
        return model

    model = _timed(times, "load_s", load)
    options = {"combination_type": str(spec.get("merge_strategy", "linear")).lower()}
    for key in ("density", "svd_rank", "svd_clamp"):
        if spec.get(key) is not None:
            options[key] = spec[key]
    if spec.get("majority_sign_method"):
        options["majority_sign_method"] = spec["majority_sign_method"].lower()
    _timed(times, "merge_s",
           lambda: model.add_weighted_adapter(ids, weights, "merged", **options))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model.set_adapter("merged")
        _timed(times, "save_s",
               lambda: model.save_pretrained(tmp, selected_adapters=["merged"]))  # fmt: skip
        model = None  # drop the first copy before the reload

        def reload():
            base = _load_base(model_dir, device, dtype)
            return PeftModel.from_pretrained(base, Path(tmp) / "merged").eval()

        return _timed(times, "reload_s", reload)


@torch.no_grad()
def evaluate_static(model, tokenizer, skills: Sequence[Any], prompter: Prompter, n: int | None,
                    batch_size: int = 32) -> dict[str, dict[str, float]]:  # fmt: skip
    """Each skill's score (greedy generation) and mean reference loglik, as ``hotmerge eval``."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {}
    for skill in skills:
        examples = skill.examples("heldout", n)
        scores, logliks = [], []
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            prompts = [prompter.prompt_ids(ex) for ex in batch]
            width = max(map(len, prompts))  # left padding for generation
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                                device=device)  # fmt: skip
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=skill.max_new_tokens, pad_token_id=pad)  # fmt: skip
            for ex, row in zip(batch, gen[:, width:].tolist(), strict=True):
                text = tokenizer.decode(row, skip_special_tokens=True)
                scores.append(float(skill.score(ex, text)))
            seqs = [p + prompter.reference_ids(ex) for p, ex in zip(prompts, batch, strict=True)]
            width = max(map(len, seqs))  # right padding for scoring
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs],
                                device=device)  # fmt: skip
            logprobs = torch.log_softmax(
                model(input_ids=ids, attention_mask=mask).logits.float(), -1
            )
            for row, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
                picked = [float(logprobs[row, t - 1, s[t]]) for t in range(len(p), len(s))]
                logliks.append(sum(picked) / len(picked))
        out[skill.name] = {"n": len(examples), "score": sum(scores) / len(scores),
                           "loglik": sum(logliks) / len(logliks)}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--adapter-root", required=True, type=Path)
    p.add_argument("--spec", required=True, help="merge spec as JSON (MergedAdapters fields)")
    p.add_argument("--skills", required=True)
    p.add_argument("-n", type=int)
    p.add_argument("--raw-prompts", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    from hotmerge.skills import SKILLS, chat_prompt
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    prompter = Prompter(tokenizer, None if args.raw_prompts else chat_prompt)
    skills = [SKILLS[name.strip()] for name in args.skills.split(",")]
    times: dict[str, float] = {}
    started = time.perf_counter()
    model = merge_and_reload(json.loads(args.spec), args.model, args.adapter_root, args.device,
                             getattr(torch, args.dtype), times)  # fmt: skip
    scores = _timed(times, "eval_s", lambda: evaluate_static(
        model, tokenizer, skills, prompter, args.n, args.batch_size))  # fmt: skip
    times["total_s"] = round(time.perf_counter() - started, 4)
    print(json.dumps({"spec": json.loads(args.spec), "times": times, "skills": scores}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
