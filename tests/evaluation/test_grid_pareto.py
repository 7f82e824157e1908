"""The sweep's pure parts on hand-made cases: grid expansion, Pareto front, the criterion,
the settings key, and the resumable results file."""

from __future__ import annotations

import json

import pytest
from hotmerge.errors import InvalidArgument
from hotmerge.evaluation.eval import EvalSettings, Prompter
from hotmerge.evaluation.grid import Candidate, Grid, expand, load_grid_file, make_grid, references
from hotmerge.evaluation.pareto import choose, criterion_value, pareto_front, parse_criterion
from hotmerge.evaluation.sweep import load_results, rank, settings_key
from hotmerge.merging.spec import affinity_key, merged_adapters_from_dict

from tests.evaluation.toy_skills import Example, chat_prompt

# -- grid ---------------------------------------------------------------------------------------


def specs(grid: Grid) -> list[dict]:
    return [c.spec for c in expand(grid)]


def test_grid_collapses_axes_a_strategy_ignores():
    grid = Grid(
        adapters=("a", "b"),
        strategies=("linear", "ties", "dare_ties"),
        densities=(0.3, 0.7),
        weights=((1.0,), (0.5, 1.5)),
        seeds=(0, 1),
    )
    out = specs(grid)
    # linear: 2 weight vectors; ties: 2 x 2 densities; dare_ties: 2 x 2 x 2 seeds
    assert len(out) == 2 + 4 + 8
    assert out[0] == {"ids": ["a", "b"], "weights": [1.0, 1.0], "merge_strategy": "linear"}
    assert out[2] == {
        "ids": ["a", "b"], "weights": [1.0, 1.0], "merge_strategy": "ties", "density": 0.3
    }  # fmt: skip
    assert out[-1] == {
        "ids": ["a", "b"], "weights": [0.5, 1.5], "merge_strategy": "dare_ties",
        "density": 0.7, "seed": 1,
    }  # fmt: skip
    assert all("seed" not in s for s in out if s["merge_strategy"] != "dare_ties")
    keys = [c.key for c in expand(grid)]
    assert len(set(keys)) == len(keys)
    assert keys[0] == affinity_key(merged_adapters_from_dict(out[0]))


def test_grid_drops_specs_that_merge_the_same_way():
    # density 1 and unset are one ties spec; weights [1] and [1, 1] are one vector
    grid = Grid(adapters=("a", "b"), strategies=("ties",), densities=(1.0, 1.0),
                weights=((1.0,), (1.0, 1.0)))  # fmt: skip
    assert len(expand(grid)) == 1


def test_grid_keeps_invalid_specs_with_a_key():
    grid = Grid(adapters=("a", "b", "c"), strategies=("slerp", "linear"))
    out = expand(grid)
    assert [c.spec["merge_strategy"] for c in out] == ["slerp", "linear"]
    assert out[0].key.startswith("invalid-")
    assert out[1].key.startswith("a-")


def test_grid_svd_rank_only_for_delta_space():
    grid = Grid(adapters=("a", "b"), strategies=("ties", "ties_svd"), svd_rank=4)
    assert ["svd_rank" in s for s in specs(grid)] == [False, True]


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(adapters=()), "give the adapters"),
        (dict(adapters=("a", "b"), strategies=("lineer",)), "unknown 'lineer'"),
        (dict(adapters=("a", "b"), weights=((1.0, 2.0, 3.0),)), "one weight per adapter"),
    ],
)
def test_grid_rejects_bad_input(bad, message):
    with pytest.raises(InvalidArgument, match=message):
        Grid(**bad)


def test_grid_from_flags_and_file(tmp_path):
    flags = make_grid({"adapters": "a,b", "strategies": "TIES", "densities": "0.3, 0.5",
                       "weights": ["1,0.5"], "seeds": "3"})  # fmt: skip
    assert flags == Grid(("a", "b"), ("ties",), (0.3, 0.5), ((1.0, 0.5),), (3,))
    path = tmp_path / "grid.yaml"
    path.write_text("adapters: [a, b]\nstrategies: [dare_ties]\ndensities: [0.4]\n"
                    "weights: [[1, 1], 0.8]\nseeds: [0, 1]\nsvd_rank: 8\n")  # fmt: skip
    grid = make_grid(load_grid_file(path))
    assert grid.weights == ((1.0, 1.0), (0.8,)) and grid.svd_rank == 8
    assert len(expand(grid)) == 4
    (tmp_path / "bad.json").write_text(json.dumps({"adapters": ["a"], "density": [0.5]}))
    with pytest.raises(InvalidArgument, match="unknown key"):
        load_grid_file(tmp_path / "bad.json")


def test_references_are_base_and_each_adapter():
    refs = references(["a", "b"])
    assert [(c.kind, c.key) for c in refs] == [
        ("base", "base"), ("adapter", "adapter:a"), ("adapter", "adapter:b")
    ]  # fmt: skip


# -- Pareto front and criterion -------------------------------------------------------------


def test_pareto_front_hand_made():
    points = [
        (0.9, 0.1),  # front: best on skill 1
        (0.5, 0.5),  # front
        (0.4, 0.4),  # dominated by (0.5, 0.5)
        (0.1, 0.9),  # front
        (0.5, 0.5),  # equal to a front point: also on the front
        (0.1, 0.5),  # dominated
        (0.9, 0.0),  # dominated by (0.9, 0.1): equal on one, worse on the other
    ]
    assert pareto_front(points) == [True, True, False, True, True, False, False]


def test_pareto_front_three_skills_and_edges():
    assert pareto_front([]) == []
    assert pareto_front([(0.2, 0.2, 0.2)]) == [True]
    points = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.3, 0.3, 0.3), (0.3, 0.3, 0.2)]
    assert pareto_front(points) == [True, True, True, True, False]


def test_criterion_min_and_weighted():
    assert parse_criterion("min") is None
    assert parse_criterion("sql=2, python=0.5") == {"sql": 2.0, "python": 0.5}
    with pytest.raises(InvalidArgument, match="give 'min'"):
        parse_criterion("sql:2")
    scores = {"sql": 0.9, "python": 0.3}
    assert criterion_value(scores, None) == 0.3
    assert criterion_value(scores, {"sql": 1.0}) == 0.9
    with pytest.raises(InvalidArgument, match="not scored"):
        criterion_value(scores, {"json": 1.0})


def test_choose_max_min_then_tie_breaks():
    cands = [
        {"a": 0.9, "b": 0.2},
        {"a": 0.5, "b": 0.6},  # best minimum
        {"a": 0.6, "b": 0.5},  # same minimum, same mean
        {"a": 0.4, "b": 0.4},
    ]
    assert choose(cands) == 1  # tie on min and mean: the first
    assert choose(cands, tie_break=[0, -2.0, -1.0, 0]) == 2  # higher loglik wins the tie
    assert choose(cands, {"a": 1.0}) == 0
    assert choose(cands, {"a": 1.0, "b": 3.0}) == 1
    assert choose([]) is None


def test_rank_marks_front_over_all_and_chooses_a_merge():
    def rec(kind, a, b, status="ok"):
        r = {"kind": kind, "label": f"{kind}{a}{b}", "key": f"{kind}{a}{b}", "status": status}
        if status == "ok":
            r["scores"], r["loglik"] = {"a": a, "b": b}, {"a": -1.0, "b": -1.0}
        return r

    records = [
        rec("adapter", 0.9, 0.0),
        rec("adapter", 0.0, 0.9),
        rec("merge", 0.5, 0.4),
        rec("merge", 0.3, 0.3),
        rec("merge", 0, 0, status="invalid"),
        rec("base", 0.95, 0.95),  # a reference may dominate every merge: then none is on it
    ]
    ranking = rank(records, ["a", "b"])
    assert ranking.front == [False, False, False, False, False, True]
    assert ranking.chosen == 2  # the best merge, whatever the references do
    ranking = rank(records[:5], ["a", "b"])
    assert ranking.front == [True, True, True, False, False]


# -- settings key, results file, prompts ---------------------------------------------------


def test_settings_key_tracks_what_changes_scores():
    ex = {"s": [Example("p", "r")]}
    base = dict(chat=True, max_new_tokens={"s": 8})
    key = settings_key("m", ex, EvalSettings(), **base)
    assert key == settings_key("m", ex, EvalSettings(concurrency=3, score_new_tokens=0), **base)
    assert key != settings_key("m2", ex, EvalSettings(), **base)
    assert key != settings_key("m", {"s": [Example("p", "r2")]}, EvalSettings(), **base)
    assert key != settings_key("m", ex, EvalSettings(), chat=False, max_new_tokens={"s": 8})
    assert key != settings_key("m", ex, EvalSettings(), chat=True, max_new_tokens={"s": 9})
    assert key != settings_key("m", ex, EvalSettings(loglik=False), **base)


def test_load_results_latest_per_key_for_these_settings(tmp_path):
    path = tmp_path / "r.jsonl"
    lines = [
        {"key": "k1", "settings": "e-1", "status": "error"},
        {"key": "k1", "settings": "e-1", "status": "ok"},
        {"key": "k2", "settings": "e-2", "status": "ok"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"key": "k3", "sett')  # cut off
    assert load_results(path, "e-1") == {"k1": lines[1]}
    assert load_results(tmp_path / "none.jsonl", "e-1") == {}


class _Tokenizer:
    """Characters as ids; BOS (1) first unless add_special_tokens=False; a fixed chat format."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<user>{m['content']}</user>" for m in messages) + "<assistant>"


def test_prompter_chat_template_and_raw():
    ex = Example("hi", " ok")
    chat = Prompter(_Tokenizer(), chat_prompt)
    assert chat.prompt_ids(ex) == [ord(c) for c in "<user>hi</user><assistant>"]
    assert chat.reference_ids(ex) == [ord(c) for c in " ok"]
    assert Prompter(_Tokenizer(), None).prompt_ids(ex) == [1, ord("h"), ord("i")]


def test_candidate_key_is_stable():
    spec = {"ids": ["a", "b"], "merge_strategy": "ties", "density": 0.5}
    assert Candidate("merge", "x", spec=spec).key == Candidate("merge", "y", spec=dict(spec)).key


@pytest.mark.parametrize("skills", [["a"], ["a", "b"], ["a", "b", "c"]])
def test_plot_writes_a_png_for_any_number_of_skills(tmp_path, skills):
    from hotmerge.evaluation.plot import plot_sweep

    rng = [0.1, 0.7, 0.4, 0.9, 0.2]
    records = [
        {"kind": "base" if i == 0 else "merge", "label": f"c{i}", "key": f"k{i}", "status": "ok",
         "scores": {s: rng[(i + j) % 5] for j, s in enumerate(skills)}}
        for i in range(5)
    ] + [{"kind": "merge", "label": "bad", "key": "kb", "status": "invalid"}]  # fmt: skip
    ranking = rank(records, skills)
    path = plot_sweep(ranking, skills, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
