"""`modelship serve --backend KEY` for every artifact kind: onnx, onnx-fp16, onnx-int8, torchscript, pt2."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.helpers import running_server

PLATFORMS = {
    "onnx": "onnxruntime_onnx", "onnx-fp16": "onnxruntime_onnx", "onnx-int8": "onnxruntime_onnx",
    "torchscript": "pytorch_libtorch", "pt2": "pytorch_torch_export",
}  # fmt: skip


def direct(bundle: Path, kind: str, x: np.ndarray) -> np.ndarray:
    """The artifact run in-process by its own runtime, as the reference for what the server answers."""
    path = bundle / json.loads((bundle / "manifest.json").read_text())["artifacts"][kind]["path"]
    if kind.startswith("onnx"):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    module = torch.jit.load(str(path)) if kind == "torchscript" else torch.export.load(str(path)).module()
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("kind", list(PLATFORMS))
def test_every_artifact_is_servable(variant_bundle: Path, tmp_path: Path, kind: str) -> None:
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with running_server(variant_bundle, "--backend", kind, "--workers-per-device", "1", tmp=tmp_path) as s:
        meta = httpx.get(s.url + "/v2/models/shapes-cnn").json()
        assert meta["platform"] == PLATFORMS[kind] and meta["inputs"][0]["datatype"] == "FP32"
        assert httpx.get(s.url + "/info").json()["server"]["backend"] == kind
        assert httpx.get(s.url + "/").json()["backend"] == kind
        doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 3, 32, 32], "data": x.ravel().tolist()}]}
        r = httpx.post(s.url + "/v2/models/shapes-cnn/infer", json=doc)
        assert r.status_code == 200, r.text
        got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(3, 5)
    np.testing.assert_allclose(got, direct(variant_bundle, kind, x), rtol=1e-5, atol=1e-5)


def test_a_backend_the_bundle_lacks_is_refused(tiny_bundle: Path, cli) -> None:
    r = cli("serve", tiny_bundle, "--backend", "onnx-int8")
    assert r.code == 2
    assert r.last_line == (
        f"modelship serve: error: --backend onnx-int8: bundle {tiny_bundle} has no onnx-int8 artifact "
        "(it has onnx, torchscript, pt2)"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["onnx", "onnx-fp16", "onnx-int8"])
def test_onnx_artifacts_run_on_a_gpu_provider(variant_bundle: Path, kind: str) -> None:
    from modelship.backends import load_backend

    path = variant_bundle / json.loads((variant_bundle / "manifest.json").read_text())["artifacts"][kind]["path"]
    backend = load_backend(kind, path, "cuda:0", 1)
    assert backend.providers[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider"), backend.providers
    x = np.random.default_rng(2).standard_normal((16, 3, 32, 32)).astype(np.float32)
    # fp32 and fp16 against fp32 on the CPU; int8 against the same int8 graph on the CPU (on random inputs int8 is
    # ~16% of the logits' range off fp32 already there, so fp32 would not show a GPU-side fault)
    got, ref = backend(x), direct(variant_bundle, "onnx-int8" if kind == "onnx-int8" else "onnx", x)
    assert got.dtype == np.float32 and got.shape == ref.shape
    tolerance = {"onnx": 1e-3, "onnx-fp16": 0.02, "onnx-int8": 0.1}[kind] * max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(got - ref).max()) <= tolerance
