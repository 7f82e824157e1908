"""benchmarks/train_skills.py end to end on the tiny random Llama (CPU, seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hotmerge.embedded import byte_level_tokenizer
from hotmerge.skills import Example, chat_prompt

from tests.helpers import tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import train_skills  # noqa: E402

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def test_only_the_answer_and_its_end_are_trained():
    tok = byte_level_tokenizer()
    tok.chat_template = TEMPLATE
    ex = Example("hi", "SELECT 1;")
    [(ids, labels)] = train_skills.encode(tok, [ex])
    prompt = tok(chat_prompt(tok, ex), add_special_tokens=False)["input_ids"]
    n = len(prompt)
    assert ids[:n] == prompt and labels[:n] == [-100] * n
    assert labels[n:] == ids[n:] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n:-1]) == "SELECT 1;"
    batch = train_skills.collate([(ids, labels), ([7], [7])], pad_id=0, device="cpu")
    assert batch["input_ids"].shape == (2, len(ids))
    assert batch["attention_mask"][1].tolist() == [1] + [0] * (len(ids) - 1)
    assert batch["labels"][1, 1:].eq(-100).all()


def test_trains_saves_and_records(tmp_path):
    model_dir = tiny_llama(tmp_path)
    tok = byte_level_tokenizer()
    tok.chat_template = TEMPLATE
    tok.pad_token = None  # as transformers 5.17 loads SmolLM2's GGUF (on the GPU machine)
    tok.save_pretrained(model_dir)
    out = tmp_path / "adapters"
    args = ["--base", str(model_dir), "--skills", "json", "--steps", "3", "--batch-size", "2"]
    train_skills.main([*args, "--eval-n", "2", "--eval-batch", "2", "--out", str(out)])
    folder = out / "json"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training.json",
    ]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 8 and len(config["target_modules"]) == 7
    assert config["base_model_name_or_path"] == train_skills.BASE_NAME
    record = json.loads((folder / "training.json").read_text())
    assert record["steps"] == 3 and record["eval_n"] == 2 and record["device"].startswith("cpu")
    assert 0 <= record["heldout_accuracy"] <= 1 and 0 <= record["base_heldout_accuracy"] <= 1
    assert record["final_loss"] > 0 and len(record["samples"]) == 2
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype.is_floating_point for k in f.keys())  # noqa: SIM118
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}  # noqa: SIM118


def test_a_quantized_base_is_the_round_trip_the_server_serves(tmp_path):
    import torch
    from hotmerge_kernels.quant import quantize
    from hotmerge_kernels.quant.reference import dequantize
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama(tmp_path), dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    changed = train_skills.quantize_base(model, "nf4")
    assert changed == 7 * model.config.num_hidden_layers
    for name, value in model.state_dict().items():
        if name.rsplit(".", 2)[-2] in train_skills.TARGET_MODULES:
            want = dequantize(quantize(before[name], "nf4"), torch.float32)
            assert torch.equal(value, want) and not torch.equal(value, before[name])
        else:  # embeddings, norms, the head: as they were
            assert torch.equal(value, before[name]), name
