"""``hotmerge eval`` and ``hotmerge sweep`` end to end on the CPU: a tiny random Llama served
in-process, two PEFT adapters, and the toy skills standing in for ``hotmerge.skills``."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from hotmerge.cli import main
from hotmerge.client import HotmergeClient
from hotmerge.evaluation.eval import EvalSettings, Prompter, Target, evaluate, probe_score_tokens
from hotmerge.evaluation.grid import Candidate, Grid, expand
from hotmerge.evaluation.pareto import pareto_front
from hotmerge.evaluation.sweep import run_sweep
from hotmerge.merging.spec import affinity_key, merged_adapters_from_dict
from hotmerge.server import start_server

from tests.evaluation import toy_skills
from tests.helpers import make_peft_adapter, tiny_llama, tiny_server_config

SKILLS = list(toy_skills.SKILLS.values())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    model_dir = tiny_llama(tmp)
    root = tmp / "adapters"
    make_peft_adapter(model_dir, root / "ad-a", r=4, seed=1, scale=2.0)
    make_peft_adapter(model_dir, root / "ad-b", r=4, seed=2, scale=2.0,
                      target_modules=("o_proj", "up_proj"))  # fmt: skip
    config = tiny_server_config(tmp, model_dir, root, max_batch_size=8, max_workers=32)
    server = start_server(config)
    yield server, model_dir, root
    server.stop(0)


@pytest.fixture(scope="module")
def client(setup):
    with HotmergeClient(setup[0].target, timeout=120) as client:
        yield client


@pytest.fixture
def skills(monkeypatch):
    return toy_skills.install(monkeypatch)


def direct_loglik(model_dir, adapter_dir, ids: list[int], start: int) -> float:
    """Mean logprob of ids[start:] given what precedes, from transformers/PEFT (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    picked = [float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids))]
    return sum(picked) / len(picked)


@pytest.mark.parametrize("adapter", [None, "ad-a"])
def test_eval_scores_match_the_text_path_and_transformers(setup, client, adapter):
    server, model_dir, root = setup
    tokenizer = server.engine.runner.tokenizer
    settings = EvalSettings(n=3, score_new_tokens=probe_score_tokens(client), concurrency=4)
    examples = {s.name: s.examples("heldout", 3) for s in SKILLS}
    result = evaluate(client, Target(adapter_id=adapter), SKILLS, examples,
                      Prompter(tokenizer, None), settings, progress=False)  # fmt: skip
    assert result.requests == 2 * 2 * 3
    for r in result.examples:
        skill = toy_skills.SKILLS[r.skill]
        ex = examples[r.skill][r.index]
        text = client.generate(ex.prompt, adapter_id=adapter, max_new_tokens=4).generated_text
        assert r.completion == text  # the ids sent are the server's own tokenization of the text
        assert r.score == skill.score(ex, text)
        prompt = tokenizer(ex.prompt)["input_ids"]
        reference = tokenizer(ex.reference, add_special_tokens=False)["input_ids"]
        assert r.reference_tokens == len(reference)
        expected = direct_loglik(model_dir, root / adapter if adapter else None,
                                 prompt + reference, len(prompt))  # fmt: skip
        assert r.loglik == pytest.approx(expected, abs=1e-3)
    for name, s in result.skills.items():
        mine = [r for r in result.examples if r.skill == name]
        assert s.n == 3 and s.score == pytest.approx(sum(r.score for r in mine) / 3)
    assert result.merge_cache_hit is None  # no merge for a plain adapter


def test_eval_merge_time_of_a_merge_already_cached(setup, client):
    tokenizer = setup[0].engine.runner.tokenizer
    spec = {"ids": ["ad-a", "ad-b"], "merge_strategy": "magnitude_prune", "density": 0.4}
    examples = {"even": SKILLS[0].examples("heldout", 1)}
    runs = [
        evaluate(
            client,
            Target(spec=spec),
            SKILLS[:1],
            examples,
            Prompter(tokenizer, None),
            EvalSettings(n=1),
            progress=False,
        )  # fmt: skip
        for _ in range(2)
    ]
    assert [r.merge_cache_hit for r in runs] == [False, True]
    assert runs[0].merge_ms > 0 and runs[1].merge_ms == runs[0].merge_ms  # the cache's record
    assert runs[0].merge_key == runs[1].merge_key


CHAT_TEMPLATE = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<assistant>"


def test_eval_cli_in_process_server_with_chat_template(setup, skills, tmp_path, capsys):
    from transformers import AutoTokenizer

    _, model_dir, root = setup
    chat_model = tmp_path / "chat-model"  # the tiny model, its tokenizer given a chat template
    shutil.copytree(model_dir, chat_model)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(chat_model)
    spec = {"ids": ["ad-a", "ad-b"], "merge_strategy": "ties", "density": 0.5}
    rc = main([
        "eval", "--serve", "--model", str(chat_model), "--adapter-root", str(root),
        "--device", "cpu", "--dtype", "float32", "--max-batch-size", "3",  # an engine field
        "--skills", "even,third", "-n", "2",
        "--base", "--adapter", "ad-a", "--spec", json.dumps(spec),
        "--out", str(tmp_path), "--no-progress",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert list(doc["targets"]) == ["base", "ad-a", "ad-a+ad-b ties d=0.5"]
    merged = doc["targets"]["ad-a+ad-b ties d=0.5"]
    assert merged["merge_key"].startswith("m-") and merged["merge_cache_hit"] is False
    assert merged["merge_ms"] > 0
    for target in doc["targets"].values():
        assert set(target["skills"]) == {"even", "third"}
        assert len(target["examples"]) == 4
        assert all(math.isfinite(e["loglik"]) and e["reference_tokens"] > 0
                   for e in target["examples"])  # fmt: skip
    examples = toy_skills.SKILLS["even"].examples("heldout", 2)
    rendered = [f"<user>{ex.prompt}</user><assistant>" for ex in examples]
    sent = [e["prompt_tokens"] for e in doc["targets"]["base"]["examples"][:2]]
    assert sent == [len(text.encode()) for text in rendered]  # one token a byte, no BOS
    md = (tmp_path / "eval.md").read_text()
    assert md.count("\n") == 2 + 3 * 2 and "| ad-a | even | 2 |" in md


def test_eval_cli_serves_a_quantized_base_and_says_so(setup, skills, tmp_path, capsys):
    """--quantize reaches the in-process server's engine; the results name the format (and a
    sweep's resume key changes with it)."""
    _, model_dir, root = setup
    rc = main([
        "eval", "--serve", "--model", str(model_dir), "--adapter-root", str(root),
        "--device", "cpu", "--dtype", "float32", "--quantize", "nf4", "--raw-prompts",
        "--skills", "even", "-n", "2", "--adapter", "ad-a", "--out", str(tmp_path),
        "--no-progress", "--no-loglik",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["model"].endswith("(float32, nf4)")
    assert len(doc["targets"]["ad-a"]["examples"]) == 2


def test_eval_cli_reports_a_bad_target(setup, skills, tmp_path, capsys):
    rc = main(["eval", "--target", setup[0].target, "--skills", "even", "-n", "2",
               "--raw-prompts", "--adapter", "no-such-adapter", "--out", str(tmp_path),
               "--no-progress"])  # fmt: skip
    assert rc == 1
    assert "no-such-adapter" in capsys.readouterr().err
    # The tiny model has no chat template: the error says what to pass
    rc = main(["eval", "--target", setup[0].target, "--skills", "even", "-n", "2",
               "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    assert rc == 1
    assert "--raw-prompts" in capsys.readouterr().err
    rc = main(["eval", "--target", setup[0].target, "--skills", "even", "-n", "2",
               "--raw-prompts", "--adapter", "ad-a", "--adapter", "ad-a", "--out", str(tmp_path),
               "--no-progress"])  # fmt: skip
    assert rc == 1
    assert "the same target given twice: ad-a" in capsys.readouterr().err


def test_eval_keeps_merges_that_differ_only_in_their_adapters(setup, skills, tmp_path, capsys):
    specs = [{"ids": ids, "merge_strategy": "ties", "density": 0.5}
             for ids in (["ad-a", "ad-b"], ["ad-b", "ad-a"])]  # fmt: skip
    rc = main(["eval", "--target", setup[0].target, "--skills", "even", "-n", "2",
               "--raw-prompts", "--no-loglik", "--out", str(tmp_path), "--no-progress",
               *[arg for spec in specs for arg in ("--spec", json.dumps(spec))]])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert list(doc["targets"]) == ["ad-a+ad-b ties d=0.5", "ad-b+ad-a ties d=0.5"]


def sweep_args(server, out, *extra):
    return [
        "sweep", "ad-a,ad-b", "--target", server.target, "--skills", "even,third", "-n", "4",
        "--raw-prompts", "--strategies", "ties,dare_ties", "--densities", "0.3,0.7",
        "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def test_sweep_cli_table_front_plot_register_export_and_resume(setup, client, skills, tmp_path,
                                                               capsys):  # fmt: skip
    server, _, _ = setup
    out = tmp_path / "sweep"
    rc = main(sweep_args(server, out, "--register", "best-mix", "--export", str(tmp_path / "x")))
    assert rc == 0, capsys.readouterr().err
    assert "7 candidates: 0 done before, 7 to score" in capsys.readouterr().out

    doc = json.loads((out / "sweep.json").read_text())
    rows = doc["candidates"]
    assert [r["kind"] for r in rows] == ["base", "adapter", "adapter"] + ["merge"] * 4
    assert [r["label"] for r in rows[3:]] == [
        "ties d=0.3", "ties d=0.7", "dare_ties d=0.3 s=0", "dare_ties d=0.7 s=0"
    ]  # fmt: skip
    assert all(r["status"] == "ok" for r in rows)
    points = [(r["score:even"], r["score:third"]) for r in rows]
    assert [r["front"] for r in rows] == pareto_front(points)
    merges = [r for r in rows if r["kind"] == "merge"]
    assert all(r["merge_ms"] > 0 for r in merges)  # each candidate's first request merged
    (chosen,) = [r for r in rows if r["chosen"]]
    assert chosen["kind"] == "merge"
    assert chosen["min_score"] == max(r["min_score"] for r in merges)
    assert doc["chosen"]["key"] == chosen["key"]
    assert doc["n_candidates"] == 7 and doc["examples"] == {"even": 4, "third": 4}
    assert doc["this_run_wall_s"] >= doc["eval_s_total"] > 0

    csv_lines = (out / "sweep.csv").read_text().splitlines()
    assert len(csv_lines) == 8 and csv_lines[0].startswith("label,kind,status,front,chosen")
    md = (out / "sweep.md").read_text()
    assert "(chosen)" in md and md.count("\n| ") == 1 + 7  # header and rows
    assert "n_candidates: 7" in md

    png = out / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 400
    assert np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0).shape[0] > 20  # not blank

    # --register: the server now serves the chosen spec under the name
    reply = client.generate("hello", adapter_id="best-mix", max_new_tokens=2)
    spec = json.loads(chosen["spec"])
    assert reply.merge.affinity_key == affinity_key(merged_adapters_from_dict(spec))
    assert json.loads((out / "merges.json").read_text()) == {"best-mix": spec}
    # --export: a PEFT adapter folder of the same spec
    exported = json.loads((tmp_path / "x" / "hotmerge_spec.json").read_text())
    assert exported["affinity_key"] == chosen["key"]
    assert (tmp_path / "x" / "adapter_model.safetensors").stat().st_size > 0

    # A rerun scores nothing again, and gives the same table
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 7
    assert main(sweep_args(server, out)) == 0
    assert "7 candidates: 7 done before, 0 to score" in capsys.readouterr().out
    assert (out / "results.jsonl").read_text().splitlines() == lines
    assert json.loads((out / "sweep.json").read_text())["candidates"] == rows

    # A weighted criterion picks the best merge on that weighting
    assert main(sweep_args(server, out, "--criterion", "even=1")) == 0
    rows = json.loads((out / "sweep.json").read_text())["candidates"]
    (chosen,) = [r for r in rows if r["chosen"]]
    assert chosen["score:even"] == max(r["score:even"] for r in rows if r["kind"] == "merge")


def test_sweep_records_invalid_candidates_and_retries_only_transient_errors(
    setup, client, tmp_path
):
    server, _, _ = setup
    tokenizer = server.engine.runner.tokenizer
    grid = Grid(adapters=("ad-a", "ad-b", "no-such"), strategies=("slerp", "linear"))
    candidates = expand(grid) + [Candidate("adapter", "ad-a", adapter_id="ad-a")]
    path = tmp_path / "r.jsonl"
    settings = EvalSettings(n=1, concurrency=2)
    args = (client, candidates, SKILLS[:1], {"even": SKILLS[0].examples("heldout", 1)},
            Prompter(tokenizer, None), settings, path, "e-test")  # fmt: skip
    records = run_sweep(*args, progress=False, log=lambda _m: None)
    assert [r["status"] for r in records] == ["invalid", "invalid", "ok"]
    assert "slerp merges exactly 2 adapters" in records[0]["error"]  # refused here
    assert "NOT_FOUND" in records[1]["error"] and "no-such" in records[1]["error"]  # by the server
    # A transient failure in the file is tried again; the rest are skipped
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[2]["status"] = "error"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    seen = []
    records = run_sweep(*args, progress=False, log=seen.append)
    assert seen[0] == "3 candidates: 2 done before, 1 to score"
    assert records[2]["status"] == "ok" and len(path.read_text().splitlines()) == 4


@pytest.mark.slow
def test_lm_eval_local_completions_on_a_named_merge(setup, client, tmp_path, monkeypatch):
    """lm-eval-harness's local-completions runs a task written by make_tasks.py against a
    named merge, over the OpenAI route, and gets what hotmerge generates for that merge."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from benchmarks.lm_eval_tasks.make_tasks import write_task

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    server, _, _ = setup
    spec = {"ids": ["ad-a", "ad-b"], "merge_strategy": "ties", "density": 0.5}
    client.merge(spec, name="lm-eval-mix")
    skill = toy_skills.SKILLS["even"]
    write_task(skill, None, tmp_path, n=3)
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": "lm-eval-mix",
            "base_url": f"{server.http_url}/v1/completions",
            "tokenized_requests": False,
            "tokenizer_backend": "none",
            "num_concurrent": 2,
            "max_retries": 1,
        },
        tasks=["hotmerge_even"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    samples = out["samples"]["hotmerge_even"]
    assert len(samples) == 3
    examples = skill.examples("heldout", 3)
    for sample in samples:
        ex = examples[sample["doc_id"]]
        assert sample["doc"] == {"prompt": ex.prompt, "reference": ex.reference}
        served = client.generate(ex.prompt, adapter_id="lm-eval-mix", max_new_tokens=4)
        assert sample["resps"][0][0] == served.generated_text
    expected = sum(
        s["resps"][0][0].strip() == s["doc"]["reference"].strip() for s in samples
    ) / len(samples)
    assert out["results"]["hotmerge_even"]["exact_match,greedy"] == pytest.approx(expected)


@pytest.mark.parametrize("strategy", ["ties", "magnitude_prune"])
def test_static_baseline_scores_what_hotmerge_scores(setup, client, strategy):
    """benchmarks/static_merge_baseline.py (PEFT merge, save, reload, transformers generate)
    gives the scores and reference logliks hotmerge gives for the same spec: the baseline the
    sweep is timed against evaluates the same thing."""
    from benchmarks.static_merge_baseline import evaluate_static, merge_and_reload

    server, model_dir, root = setup
    tokenizer = server.engine.runner.tokenizer
    spec = {"ids": ["ad-a", "ad-b"], "weights": [1.0, 0.7], "merge_strategy": strategy,
            "density": 0.6}  # fmt: skip
    prompter = Prompter(tokenizer, None)
    examples = {s.name: s.examples("heldout", 6) for s in SKILLS}
    served = evaluate(client, Target(spec=spec), SKILLS, examples, prompter,
                      EvalSettings(n=6), progress=False)  # fmt: skip
    times: dict[str, float] = {}
    model = merge_and_reload(spec, str(model_dir), root, "cpu", torch.float32, times)
    static = evaluate_static(model, tokenizer, SKILLS, prompter, 6, batch_size=4)
    assert set(times) == {"load_s", "merge_s", "save_s", "reload_s"}
    for name, s in served.skills.items():
        assert static[name]["score"] == s.score
        assert static[name]["loglik"] == pytest.approx(s.loglik, abs=1e-3)
