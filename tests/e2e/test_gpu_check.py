"""benchmarks/gpu_check.py, the one call a session with a GPU makes: its CPU dry run, every check, so it never rots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

CHECKS = ["environment", "gpu tests", "train step", "train", "export parity", "serve", "onnxruntime cuda"]


@pytest.mark.slow
def test_the_gpu_check_runs_every_check_on_the_cpu_and_writes_its_tables(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out), "--work",
                        str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=400)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())["results"]
    assert list(results) == CHECKS
    assert {name: x["status"] for name, x in results.items()} == dict.fromkeys(CHECKS, "ok")
    figures = {name: x["figures"] for name, x in results.items()}
    assert figures["environment"]["cuda"] is False and figures["environment"]["litserve"]
    assert "skipped" in figures["gpu tests"]["summary"] and figures["gpu tests"]["problems"] == []
    assert figures["train step"]["samples_per_s"]["fp32"] > 0
    runs = figures["train"]["runs"]
    assert set(runs) == {"tutorial loop", "modelship train --amp off"}
    assert all(run["wall_s"] > 0 and 0 <= run["best_val_acc"] <= 1 for run in runs.values())
    parity = figures["export parity"]
    assert parity["passed"] and parity["export_parity_passed"] and len(parity["checks"]) == 2 * 4  # 2 formats x 4
    served = figures["serve"]["images_per_s"]
    assert set(served) == {"pt2 in-process, batch 32", "pt2 served, batch 1", "pt2 served, dynamic batching"}
    assert all(rate > 0 for rate in served.values())
    table = (out / "gpu_check.md").read_text()
    assert "## serve (ok" in table and "| ratios / pt2: dynamic batching / batch 1 |" in table
