"""The light `modelship[serve]` install: ONNX bundles are served and predicted with torch not importable at all.

A sitecustomize on PYTHONPATH makes torch, torchvision, onnx, onnxscript, tensorboard and rich fail to import in the
server, its spawned inference workers and the client, as they would in an install without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO, free_port, run_modelship, running_server

CLASSES = ("circle", "cross", "ring", "square", "triangle")
HEAVY = ("torch", "torchvision", "onnx", "onnxscript", "tensorboard", "rich")
BLOCKER = f'''
import sys

class NotInstalled:
    """Imports of {HEAVY} fail as in an install without them."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the light serve install)", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
'''


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("light-site")
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": f"{site}{os.pathsep}{REPO}"}


def test_the_blocker_really_blocks(no_torch: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import torch"], env={**os.environ, **no_torch}, capture_output=True, text=True
    )
    assert proc.returncode == 1 and "No module named 'torch' (not in the light serve install)" in proc.stderr


def test_serve_and_predict_an_onnx_bundle_without_torch(
    tiny_bundle: Path, tmp_path: Path, data_dir: Path, no_torch: dict[str, str]
) -> None:
    png = sorted(data_dir.glob("shapes-*/val/circle/*.png"))[0]
    assert run_modelship("--version", env=no_torch).out.startswith("modelship ")
    grpc_port = free_port()
    with running_server(tiny_bundle, "--workers-per-device", "1", "--grpc-port", str(grpc_port), env=no_torch,
                        tmp=tmp_path) as s:  # fmt: skip
        over_grpc = run_modelship("predict", "--bundle", str(tiny_bundle), "--url", f"grpc://127.0.0.1:{grpc_port}",
                                  str(png), "--format", "jsonl", env=no_torch)  # fmt: skip
        assert over_grpc.code == 0, over_grpc.err
        r = run_modelship("predict", "--url", s.url, str(png), "--format", "jsonl", env=no_torch)
        assert r.code == 0, r.err
        answer = json.loads(r.out)
        assert answer["label"] in CLASSES and answer["top_k"][0]["label"] == answer["label"]
        assert sorted(t["label"] for t in answer["top_k"]) == sorted(CLASSES)
        batch = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 3, 32, 32], "data": [0.5] * 6144}]}
        assert httpx.post(s.url + "/v2/models/shapes-cnn/infer", json=batch).status_code == 200
        assert json.loads(over_grpc.out)["label"] == answer["label"]  # gRPC too, without torch
    assert "No module named" not in s.output() and "Traceback" not in s.output()
    offline = run_modelship("predict", "--bundle", str(tiny_bundle), str(png), "--format", "jsonl", env=no_torch)
    assert offline.code == 0, offline.err
    assert json.loads(offline.out)["label"] == answer["label"]  # offline, no server, still no torch
    val = png.parents[1]
    evaluated = run_modelship(
        "evaluate", str(tiny_bundle), "--data", str(val), "--out", str(tmp_path / "ev"), env=no_torch
    )
    assert evaluated.code == 0, evaluated.err
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["n"] == len(list(val.rglob("*.png")))


def test_the_torchscript_backend_says_it_needs_torch(tiny_bundle: Path, no_torch: dict[str, str]) -> None:
    r = run_modelship("serve", str(tiny_bundle), "--backend", "torchscript", env=no_torch)
    assert r.code == 2
    assert r.last_line == (
        "modelship serve: error: --backend torchscript runs on torch, which is not installed here; "
        "pip install 'modelship[serve,torch]', or serve the onnx artifact"
    )
