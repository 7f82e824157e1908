"""grpc_stream_cost.py runs end to end at a small size: every server (hotmerge's own front too)
streams every step's token to every client, and the rows it writes are the engine thread's
periods and the CPU a message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_small_run_writes_a_row_per_server(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "server"), *sys.path])}
    args = ["--streams", "3", "--steps", "15", "--device-ms", "2", "--engine-py-ms", "0.2",
            "--engine-releases", "4", "--out", str(out)]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "grpc_stream_cost.py"), *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["server"] for r in rows] == ["none", "sync", "aio", "hotmerge"]
    for row in rows:
        # a step is at least the device's 2 ms and the engine's 0.2 ms of Python
        assert row["step_ms_p50"] >= 2.2 and row["step_ms_p99"] >= row["step_ms_p50"]
    # the servers did work for every message (the engine alone sends none)
    assert all(r["server_cpu_us_per_message"] > 0 for r in rows[1:])
