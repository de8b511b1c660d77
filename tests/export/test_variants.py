"""Deployment variants: fp16 and int8 ONNX files, their gate on labelled images, and the bad input around them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from modelship.export.variants import cpu_int8_features
from modelship.preprocess import Preprocess, preprocess_image
from modelship.training.checkpoint import load_checkpoint
from modelship.training.models import build_model
from tests.helpers import write_folder


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def labelled_val(ckpt: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    """The shapes validation images the checkpoint was validated on, through the manifest's preprocessing."""
    pre = Preprocess.from_dict(manifest["preprocess"])
    root = Path(load_checkpoint(ckpt)["data"]["source"]["root"])
    pairs = [(p, manifest["classes"].index(p.parent.name)) for p in sorted((root / "val").rglob("*.png"))]
    x = np.stack([preprocess_image(Image.open(p), pre) for p, _ in pairs])
    return x, np.asarray([label for _, label in pairs])


def test_the_variants_are_listed_hashed_and_checked(variant_bundle: Path) -> None:
    m = json.loads((variant_bundle / "manifest.json").read_text())
    fp16, int8, fp32 = (m["artifacts"][k] for k in ("onnx-fp16", "onnx-int8", "onnx"))
    assert (fp16["path"], fp16["precision"], fp16["io"]) == ("model.fp16.onnx", "fp16", "float32")
    assert (int8["path"], int8["precision"], int8["format"], int8["per_channel"]) == (
        "model.int8.onnx",
        "int8",
        "QDQ",
        True,
    )
    assert int8["calibration"] == {
        "method": "minmax",
        "images": 256,
        "source": "the checkpoint's training split (256 images)",
    }
    assert set(int8["cpu_int8"]) == {"avx512_vnni", "avx_vnni", "amx_int8"} and int8["cpu_int8"] == cpu_int8_features()
    assert fp16["checked_on"] == int8["checked_on"] == ["onnxruntime-cpu"]
    assert int8["bytes"] < fp16["bytes"] < fp32["bytes"]  # the quickstart test checks the ratios at full size
    gate = m["parity"]["variant_gate"]
    assert gate == {"max_accuracy_drop": 0.08, "min_agreement": {"fp16": 0.99, "int8": 0.8}}
    assert {(v["artifact"], v["runtime"], v["passed"]) for v in m["parity"]["variants"]} == {
        ("onnx-fp16", "onnxruntime-cpu", True), ("onnx-int8", "onnxruntime-cpu", True),
    }  # fmt: skip
    report = json.loads((variant_bundle / "parity.json").read_text())
    assert report["variant_images"] == "the checkpoint's validation split (100 images)"
    assert len(report["variants"]) == 2 and report["passed"] is True


def test_int8_is_static_qdq_with_per_channel_int8_weights(variant_bundle: Path) -> None:
    model = onnx.load(str(variant_bundle / "model.int8.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert not ops & {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger"}  # not QOperator (ORT#12072)
    inits = {i.name: i for i in model.graph.initializer}
    conv_weights = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for w in conv_weights:
        node = dq[w]
        q = numpy_helper.to_array(inits[node.input[0]])
        scale = numpy_helper.to_array(inits[node.input[1]])
        assert q.dtype == np.int8 and scale.shape == (q.shape[0],)  # one scale per output channel
        assert (scale > 0).all()  # no collapsed channel (ORT#11415)


def test_fp16_computes_in_half_with_float32_io(variant_bundle: Path) -> None:
    model = onnx.load(str(variant_bundle / "model.fp16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [i for i in model.graph.initializer if len(i.dims) == 4]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    onnx.checker.check_model(model, full_check=True)


def test_the_reported_gate_equals_an_independent_count(variant_bundle: Path, trained_ckpt: Path) -> None:
    m = json.loads((variant_bundle / "manifest.json").read_text())
    x, labels = labelled_val(trained_ckpt, m)
    ckpt = load_checkpoint(trained_ckpt)
    eager = build_model(ckpt["model"]["arch"], ckpt["model"]["kwargs"]).eval()
    eager.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        ref = eager(torch.from_numpy(x)).numpy().argmax(1)
    for v in m["parity"]["variants"]:
        got = session(variant_bundle / m["artifacts"][v["artifact"]]["path"]).run(None, {"input": x})[0].argmax(1)
        assert v["images"] == len(x) == 100
        assert v["top1_agreement"] == pytest.approx(float((got == ref).mean()))
        assert v["accuracy"] == pytest.approx(float((got == labels).mean()))
        assert v["reference_accuracy"] == pytest.approx(float((ref == labels).mean()))


def test_a_lossy_int8_fails_the_gate_by_name_and_is_not_served(trained_ckpt: Path, tmp_path: Path, cli) -> None:
    black = tmp_path / "black"
    black.mkdir()
    Image.new("RGB", (32, 32)).save(black / "black.png")  # ranges measured on one black image: int8 saturates
    out = tmp_path / "b"
    args = ["--formats", "onnx", "--variants", "int8", "--calibration-data", black, "--max-accuracy-drop", "0"]
    r = cli("export", trained_ckpt, "--out", out, *args)
    assert r.code == 1
    assert r.last_line.startswith(f"modelship export: error: bundle {out} written, but it must not ship: 1 check(s)")
    assert "onnx-int8 on onnxruntime-cpu (100 labelled images): top-1 agreement" in r.last_line
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] is False and manifest["parity"]["failed"][0].startswith("onnx-int8")
    assert "onnx-int8  onnxruntime-cpu  100" in r.out and r.out.rstrip().endswith("FAIL")
    r = cli("serve", out, "--backend", "onnx")
    assert r.code == 2 and r.last_line.startswith(
        f"modelship serve: error: bundle {out} failed its gates and must not ship: onnx-int8: top-1 agreement 0."
    )
    assert r.last_line.endswith("on onnxruntime-cpu, 100 labelled images")


def test_verify_rechecks_the_variants(variant_bundle: Path, cli) -> None:
    r = cli("verify", variant_bundle)
    assert r.code == 0, r.err
    assert "onnx-fp16  onnxruntime-cpu  100" in r.out and "onnx-int8  onnxruntime-cpu  100" in r.out


@pytest.fixture
def bare_state_dict(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "cnn.pt"
    kwargs = {"num_classes": 5, "in_channels": 3, "image_size": [32, 32], "width": 8}
    torch.save(build_model("cnn", kwargs).state_dict(), path)
    return path


BARE = ["--model", "cnn", "--model-kwargs", '{"width": 8}', "--input-shape", "3,32,32"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--variants", "int4"], "--variants must name one or more of fp16, int8, got 'int4'"),
        (["--formats", "onnx,tflite"], "--formats must name one or more of onnx, torchscript, pt2, got 'onnx,tflite'"),
        (["--formats", "pt2", "--variants", "fp16"], "--variants are made from the ONNX file; add onnx to --formats"),
        (["--variants", "int8", "--validation-data", "{val}"], "int8 needs real images to calibrate on"),
        (["--variants", "fp16"], "--variants are gated on labelled validation images"),
        (["--variants", "int8", "--calibration-data", "{empty}", "--validation-data", "{val}"], "has no images"),
        (["--variants", "int8", "--calibration-data", "{broken}", "--validation-data", "{val}"], "cannot read image"),
        (["--variants", "int8", "--calibration-data", "{val}/nope", "--validation-data", "{val}"], "is not a folder"),
        (["--variants", "fp16", "--validation-data", "{other}"], "has class folders ['dog'] the model does not know"),
        (["--calibration-method", "mse"], "argument --calibration-method: invalid choice: 'mse'"),
    ],
    ids=["variant", "format", "no-onnx", "no-calibration", "no-validation", "empty", "broken", "missing", "classes",
         "method"],
)  # fmt: skip
def test_bad_variant_input_is_one_line_exit_2_nothing_written(
    bare_state_dict: Path, tmp_path: Path, cli, extra: list[str], message: str
) -> None:
    classes = ["circle", "cross", "ring", "square", "triangle"]
    write_folder(tmp_path / "val", dict.fromkeys(classes, 2), size=(32, 32))
    write_folder(tmp_path / "gray", {"a": 3}, mode="L", size=(32, 32))
    write_folder(tmp_path / "other", {"dog": 2}, size=(32, 32))
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    dirs = {k: tmp_path / k for k in ("val", "gray", "other", "empty", "broken")}
    args = [a.format(**dirs) for a in extra]
    r = cli("export", bare_state_dict, "--out", tmp_path / "b", *BARE, "--classes", ",".join(classes), *args)
    assert r.code == 2, r.err
    assert r.last_line.startswith("modelship export: error: ") and message in r.last_line, r.last_line
    assert "Traceback" not in r.err
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_fp16_keeps_resize_in_float32_without_cast_chains(tmp_path: Path, trained_ckpt: Path, cli) -> None:
    torch.manual_seed(0)
    torch.save(build_model("tests.helpers:upsample_net", {"num_classes": 5}).state_dict(), tmp_path / "up.pt")
    val = Path(load_checkpoint(trained_ckpt)["data"]["source"]["root"]) / "val"
    classes = sorted(p.name for p in val.iterdir())
    r = cli(
        "export", tmp_path / "up.pt", "--out", tmp_path / "b", "--model", "tests.helpers:upsample_net",
        "--input-shape", "3,32,32", "--classes", ",".join(classes), "--formats", "onnx", "--variants", "fp16",
        "--validation-data", val, "--fp16-min-agreement", "0.9",  # random weights: near-ties may flip
    )  # fmt: skip
    assert r.code == 0, r.err
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["artifacts"]["onnx-fp16"]["kept_float32"] == ["Resize"]
    model = onnx.load(str(tmp_path / "b" / "model.fp16.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    (resize,) = [n for n in model.graph.node if n.op_type == "Resize"]
    cast_in = producers[resize.input[0]]
    assert cast_in.op_type == "Cast" and cast_in.attribute[0].i == onnx.TensorProto.FLOAT  # computed in float32
    chains = [
        n
        for n in model.graph.node
        if n.op_type == "Cast" and getattr(producers.get(n.input[0]), "op_type", "") == "Cast"
    ]
    assert chains == []  # no Cast feeding a Cast (onnxconverter-common#306)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    ref = session(tmp_path / "b" / "model.onnx").run(None, {"input": x})[0]
    half = session(tmp_path / "b" / "model.fp16.onnx").run(None, {"input": x})[0]
    assert half.dtype == np.float32 and np.abs(half - ref).max() < 1e-2


def test_pt2_runs_every_batch_size_like_eager(tiny_bundle: Path, tiny_ckpt: Path) -> None:
    program = torch.export.load(str(tiny_bundle / "model.pt2")).module()
    ckpt = load_checkpoint(tiny_ckpt)
    eager = build_model(ckpt["model"]["arch"], ckpt["model"]["kwargs"]).eval()
    eager.load_state_dict(ckpt["state_dict"])
    for n in (1, 2, 7, 64, 130):  # 130: past the largest batch parity checked, still symbolic
        x = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(program(x), eager(x)), n
