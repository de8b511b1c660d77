"""`modelship triton`: a Triton model repository checked against Triton's own config schema, and a KServe manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from modelship.files import sha256_file


def parse(path: Path) -> model_config_pb2.ModelConfig:
    """Triton's ModelConfig protobuf: what tritonserver itself reads config.pbtxt into."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize(("backend", "file", "names"), [
    ("onnx", "model.onnx", ("input", "logits")),
    ("onnx-int8", "model.int8.onnx", ("input", "logits")),
    ("torchscript", "model.torchscript.pt", ("INPUT__0", "OUTPUT__0")),
])  # fmt: skip
def test_the_repository_is_what_triton_reads(
    variant_bundle: Path, tmp_path: Path, cli, backend: str, file: str, names: tuple[str, str]
) -> None:
    repo = tmp_path / "repo"
    r = cli("triton", variant_bundle, "--out", repo, "--backend", backend, "--max-batch-size", "16", "--instances", "2")
    assert r.code == 0, r.err
    model = repo / "shapes-cnn"
    assert r.out.strip() == str(model)
    weights = "model.pt" if backend == "torchscript" else "model.onnx"
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == [
        "inferenceservice.yaml", "shapes-cnn", "shapes-cnn/1", f"shapes-cnn/1/{weights}", "shapes-cnn/config.pbtxt",
        "shapes-cnn/labels.txt",
    ]  # fmt: skip
    version = next((model / "1").iterdir())
    assert sha256_file(version) == sha256_file(variant_bundle / file)  # byte for byte
    config = parse(model / "config.pbtxt")
    manifest = json.loads((variant_bundle / "manifest.json").read_text())
    assert config.name == "shapes-cnn" and config.max_batch_size == 16
    assert config.platform == ("pytorch_libtorch" if backend == "torchscript" else "onnxruntime_onnx")
    (inp,), (out,) = config.input, config.output
    assert (inp.name, out.name) == names
    assert inp.data_type == out.data_type == model_config_pb2.TYPE_FP32
    assert list(inp.dims) == [3, 32, 32] and list(out.dims) == [5]  # the batch dimension is implied
    assert out.label_filename == "labels.txt"
    assert (model / "labels.txt").read_text().splitlines() == manifest["classes"]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_AUTO)]
    isvc = yaml.safe_load((repo / "inferenceservice.yaml").read_text())
    assert (isvc["apiVersion"], isvc["kind"], isvc["metadata"]["name"]) == (
        "serving.kserve.io/v1beta1", "InferenceService", "shapes-cnn",
    )  # fmt: skip
    predictor = isvc["spec"]["predictor"]["model"]
    assert predictor["modelFormat"]["name"] == "triton" and predictor["protocolVersion"] == "v2"
    assert predictor["storageUri"] == "STORAGE_URI"  # the user's to set, as the file's comments say


def test_the_default_max_batch_is_the_checked_one(variant_bundle: Path, tmp_path: Path, cli) -> None:
    assert cli("triton", variant_bundle, "--out", tmp_path / "repo").code == 0
    assert parse(tmp_path / "repo" / "shapes-cnn" / "config.pbtxt").max_batch_size == 64


@pytest.mark.parametrize(("extra", "message"), [
    (["--backend", "pt2"], "--backend must be one of onnx, onnx-fp16, onnx-int8, torchscript (Triton has no standard"),
    (["--backend", "onnx-fp16", "--bundle", "tiny"], "has no onnx-fp16 artifact (it has onnx, torchscript, pt2)"),
    (["--out-exists"], "exists and is not an empty folder; pick a new one"),
    (["--max-batch-size", "65"], "--max-batch-size 65 is over the largest batch the bundle was checked at (64)"),
    (["--instances", "0"], "--instances must be at least 1, got 0"),
])  # fmt: skip
def test_bad_triton_input_is_one_line_exit_2_nothing_written(
    variant_bundle: Path, tiny_bundle: Path, tmp_path: Path, cli, extra: list[str], message: str
) -> None:
    bundle = tiny_bundle if "--bundle" in extra else variant_bundle
    extra = [a for a in extra if a not in ("--bundle", "tiny")]
    out = tmp_path / "repo"
    if "--out-exists" in extra:
        extra.remove("--out-exists")
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    r = cli("triton", bundle, "--out", out, *extra)
    assert r.code == 2 and r.last_line.startswith("modelship triton: error: ") and message in r.last_line, r.last_line
    assert sorted(p.name for p in tmp_path.iterdir()) == (["repo"] if out.exists() else [])
    if out.exists():
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_failed_bundle_is_not_deployed(variant_bundle: Path, tmp_path: Path, cli) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(variant_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    int8 = next(g for g in manifest["gates"] if g["gate"] == "onnx-int8")
    int8.update(passed=False, detail="top-1 agreement 0.9000 (at least 0.97)")
    manifest["passed"] = False
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    r = cli("triton", bundle, "--out", tmp_path / "repo")
    assert r.code == 2 and r.last_line == (
        f"modelship triton: error: bundle {bundle} failed its gates and must not ship: "
        "onnx-int8: top-1 agreement 0.9000 (at least 0.97)"
    )
    assert not (tmp_path / "repo").exists()
