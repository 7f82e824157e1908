"""Newcomer frictions of issue 12: set-up, start-up errors and CLI output."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest
from hotmerge.cli import main
from hotmerge.engine import load_runner
from hotmerge.errors import InvalidArgument
from hotmerge.server import open_port

from tests.helpers import free_port, make_peft_adapter, tiny_llama, tiny_server_config

REPO = Path(__file__).resolve().parents[2]


def test_make_serve_installs_serving_deps_only_and_shows_progress():
    plan = subprocess.run(
        ["make", "-n", "serve", "VENV=/nonexistent-venv"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    installs = [line for line in plan.splitlines() if "pip install" in line]
    assert installs and not any("[test]" in line for line in installs)
    assert not any(" -q" in line for line in installs)
    tests = subprocess.run(
        ["make", "-n", "test", "VENV=/nonexistent-venv"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert any('pip install -e ".[test]"' in line for line in tests.splitlines())


def test_license_is_an_spdx_string():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    build = project["build-system"]["requires"]
    assert any(r.startswith("setuptools>=77") for r in build)  # PEP 639 strings


def test_model_without_tokenizer_is_a_clear_error(tmp_path):
    model_dir = tiny_llama(tmp_path)
    for f in list(model_dir.iterdir()):
        if "token" in f.name:
            f.unlink()
    with pytest.raises(InvalidArgument, match="no usable tokenizer.*save the tokenizer"):
        load_runner(str(model_dir), device="cpu", dtype="float32")


def test_cli_does_not_blame_a_loading_server(tmp_path, capsys):
    model_dir = tiny_llama(tmp_path)
    running = open_port(tiny_server_config(tmp_path, model_dir, tmp_path / "adapters"))
    try:  # the port answers, the model is "still loading": no engine attached
        assert main(["info", "--target", running.target]) == 1
    finally:
        running.stop(0)
    err = capsys.readouterr().err
    assert "still loading" in err and "is `hotmerge serve` running" not in err
    assert main(["info", "--target", f"127.0.0.1:{free_port()}", "--timeout", "5"]) == 1
    assert "is `hotmerge serve` running" in capsys.readouterr().err


def test_one_adapter_merge_does_not_claim_a_cache_hit(tmp_path, capsys):
    from hotmerge.server import start_server

    model_dir = tiny_llama(tmp_path)
    make_peft_adapter(model_dir, tmp_path / "adapters" / "solo", r=4, seed=1)
    config = tiny_server_config(tmp_path, model_dir, tmp_path / "adapters")
    with start_server(config) as running:
        assert main(["merge", "--target", running.target, "solo"]) == 0
        out = capsys.readouterr().out
        assert "no merge needed" in out and "cache hit" not in out
        two = ["merge", "--target", running.target, "solo", "--weights", "0.5"]
        assert main(two) == 0
        assert "merged in" in capsys.readouterr().out  # a real merge still says so
