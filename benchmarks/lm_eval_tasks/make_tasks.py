"""Write lm-eval-harness tasks from hotmerge skills' held-out examples (local files, offline).

    python benchmarks/lm_eval_tasks/make_tasks.py --skills sql,python --tokenizer MODEL_DIR
    lm_eval --model local-completions --tasks hotmerge_sql \
        --include_path benchmarks/lm_eval_tasks \
        --model_args model=my-merge,base_url=http://localhost:8080/v1/completions,\
tokenized_requests=False,num_concurrent=8

For each skill it writes ``data/<skill>.jsonl`` (``prompt``: the chat-templated prompt as text,
``reference``: the answer) and ``<skill>.yaml``, task ``hotmerge_<skill>``: greedy
``generate_until`` of the skill's ``max_new_tokens``, scored by exact match (surrounding
whitespace ignored). lm-eval's exact match is stricter than a skill's own score (which may
normalise, or execute code): ``hotmerge eval`` is the reference number.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = "_hotmerge_skill_template_yaml"
STOPS = ["<|im_end|>", "<|endoftext|>", "</s>"]  # end-of-turn texts; the EOS token stops too


def write_task(skill, tokenizer, out_dir: Path = HERE, *, n: int | None = None,
               template=None, split: str = "heldout") -> Path:  # fmt: skip
    """Write one skill's task; ``template``: chat_prompt(tokenizer, example) (None: raw)."""
    data = out_dir / "data" / f"{skill.name}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    with data.open("w") as f:
        for ex in skill.examples(split, n):
            prompt = ex.prompt if template is None else template(tokenizer, ex)
            f.write(json.dumps({"prompt": prompt, "reference": ex.reference}) + "\n")
    if not (out_dir / TEMPLATE).exists():
        (out_dir / TEMPLATE).write_text((HERE / TEMPLATE).read_text())
    task = out_dir / f"{skill.name}.yaml"
    task.write_text(
        f"include: {TEMPLATE}\n"
        f"task: hotmerge_{skill.name}\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        f"generation_kwargs:\n  until: {json.dumps(STOPS)}\n  do_sample: false\n"
        f"  max_gen_toks: {skill.max_new_tokens}\n"
    )
    return task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skills", required=True, help="comma-separated skill names")
    p.add_argument("--tokenizer", help="model folder whose chat template renders the prompts")
    p.add_argument("--raw-prompts", action="store_true", help="no chat template")
    p.add_argument("-n", type=int, help="examples per skill (default: all held-out)")
    p.add_argument("--out", type=Path, default=HERE, help="(default: this folder)")
    args = p.parse_args(argv)
    from hotmerge.skills import SKILLS, chat_prompt

    tokenizer = template = None
    if not args.raw_prompts:
        from transformers import AutoTokenizer

        if not args.tokenizer:
            p.error("give --tokenizer (the served model's folder), or --raw-prompts")
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
        template = chat_prompt
    for name in args.skills.split(","):
        task = write_task(SKILLS[name.strip()], tokenizer, args.out, n=args.n, template=template)
        print(f"wrote {task}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
