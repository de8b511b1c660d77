"""`modelship export` and `modelship verify`: artifacts, manifest, the parity gate, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from modelship.export.bundle import export
from modelship.export.config import ExportConfig, ExportOptions
from modelship.files import sha256_file
from modelship.manifest import check_bundle
from modelship.training.checkpoint import load_checkpoint
from modelship.training.models import REGISTRY, build_model, model_kwargs
from tests.helpers import run_modelship


def save_state_dict(tmp_path: Path, arch: str, shape: list[int], classes: int = 3, **extra) -> Path:
    torch.manual_seed(0)
    model = build_model(arch, model_kwargs(arch, classes, shape, extra))
    path = tmp_path / f"{arch.replace(':', '_')}.pt"
    torch.save(model.state_dict(), path)
    return path


def rehash(bundle: Path, kind: str) -> None:
    """Make the manifest's sha256 match a replaced artifact, as an attacker or a careless copy would."""
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["artifacts"][kind]["sha256"] = sha256_file(bundle / manifest["artifacts"][kind]["path"])
    path.write_text(json.dumps(manifest))


# --------------------------------------------------------------------------------------------- bundle contents


def test_bundle_holds_the_manifest_contract(tiny_bundle: Path, tiny_ckpt: Path) -> None:
    assert sorted(p.name for p in tiny_bundle.iterdir()) == [
        "manifest.json", "model.onnx", "model.pt2", "model.torchscript.pt", "parity.json", "reference.json",
    ]  # fmt: skip
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    ckpt = load_checkpoint(tiny_ckpt)
    assert (m["format"], m["version"], m["name"]) == ("modelship.bundle", 2, "shapes-cnn")
    assert m["classes"] == ckpt["data"]["classes"]
    assert m["model"] == {"arch": "cnn", "kwargs": ckpt["model"]["kwargs"]}
    assert m["input"] == {"name": "input", "shape": ["batch", 3, 32, 32], "dtype": "float32"}
    assert m["output"] == {"name": "logits", "shape": ["batch", 5], "dtype": "float32"}
    assert m["preprocess"] == {
        "size": [32, 32],
        "channels": 3,
        "mean": ckpt["data"]["mean"],
        "std": ckpt["data"]["std"],
    }
    for kind, art in m["artifacts"].items():
        assert art["sha256"] == sha256_file(tiny_bundle / art["path"]), kind
    assert m["artifacts"]["onnx"]["opset"] == 18 and m["artifacts"]["torchscript"]["method"] == "script"
    assert {k: a["precision"] for k, a in m["artifacts"].items()} == dict.fromkeys(
        ("onnx", "torchscript", "pt2"), "fp32"
    )
    assert m["artifacts"]["onnx"]["checked_on"] == ["onnxruntime-cpu"] and m["artifacts"]["pt2"]["checked_on"] == [
        "torch-cpu"
    ]
    assert m["parity"]["passed"] is True and m["parity"]["batch_sizes"] == [1, 2, 7, 64]
    assert m["parity"]["max_abs_err"] < 1e-4 and m["parity"]["min_top1_agreement"] == 1.0
    # every gate with its verdict (export's: parity; a run adds its accuracy floor), and `passed` their conjunction
    assert [(g["gate"], g["passed"], g["checks"]) for g in m["gates"]] == [("parity", True, m["parity"]["checks"])]
    assert m["gates"][0]["detail"].startswith(f"{m['parity']['checks']} checks within atol 0.0001, rtol 0.001")
    assert m["passed"] is True
    assert m["source"]["sha256"] == sha256_file(tiny_ckpt) and m["source"]["kind"] == "modelship.checkpoint"
    assert {"torch", "onnx", "onnxruntime"} <= set(m["versions"])
    check_bundle(tiny_bundle)  # the reader serving uses accepts it


def test_onnx_file_is_self_contained_with_a_symbolic_batch(tiny_bundle: Path) -> None:
    proto = onnx.load(str(tiny_bundle / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    session = ort.InferenceSession(str(tiny_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5, 130):  # batch sizes parity never saw still work
        out = session.run(None, {"input": np.zeros((batch, 3, 32, 32), np.float32)})[0]
        assert out.shape == (batch, 5)


def test_parity_report_covers_every_artifact_batch_and_input_kind(tiny_bundle: Path) -> None:
    report = json.loads((tiny_bundle / "parity.json").read_text())
    assert report["passed"] is True
    seen = {(c["artifact"], c["runtime"], c["inputs"], c["batch_size"]) for c in report["checks"]}
    for artifact, runtime in (("onnx", "onnxruntime-cpu"), ("torchscript", "torch-cpu"), ("pt2", "torch-cpu")):
        for kind in ("random", "real"):  # real: the shapes validation images are on disk
            for batch in (1, 2, 7, 64):
                assert (artifact, runtime, kind, batch) in seen
    c = report["checks"][0]
    assert set(c) == {
        "artifact", "runtime", "inputs", "batch_size", "max_abs_err", "mean_abs_err", "max_rel_err",
        "top1_agreement", "flips", "atol", "rtol", "passed",
    }  # fmt: skip
    assert (c["atol"], c["rtol"]) == (1e-4, 1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_every_registry_model_exports_and_passes_parity(tmp_path: Path, arch: str) -> None:
    sd = save_state_dict(tmp_path, arch, [3, 32, 32])
    cfg = ExportConfig(sd, tmp_path / "b", ExportOptions(device="cpu"), model=arch, input_shape=(3, 32, 32))
    bundle = export(cfg)
    assert bundle.passed, [c.describe() for c in bundle.checks if not c.passed]
    assert {(c.artifact, c.batch_size) for c in bundle.checks} == {
        (a, b) for a in ("onnx", "torchscript", "pt2") for b in (1, 2, 7, 64)
    }
    assert bundle.manifest["classes"] == ["0", "1", "2"]  # inferred from the head, no --classes given


def test_batch_traps_view_flatten_batchnorm_dropout(tmp_path: Path) -> None:
    sd = save_state_dict(tmp_path, "tests.helpers:view_flatten", [3, 8, 8], classes=4)
    cfg = ExportConfig(checkpoint=sd, out=tmp_path / "b", model="tests.helpers:view_flatten", input_shape=(3, 8, 8))
    bundle = export(cfg)
    assert bundle.passed and {c.batch_size for c in bundle.checks} == {1, 2, 7, 64}
    assert bundle.manifest["parity"]["max_abs_err"] < 1e-5


def test_data_dependent_control_flow_never_ships_a_wrong_branch(tmp_path: Path, cli) -> None:
    sd = save_state_dict(tmp_path, "tests.helpers:sign_branch", [3, 2, 2])
    args = ["--model", "tests.helpers:sign_branch", "--input-shape", "3,2,2"]
    r = cli("export", sd, "--out", tmp_path / "both", *args)
    assert r.code == 1
    assert "ONNX export failed" in r.last_line and "data-dependent control flow" in r.last_line
    assert not (tmp_path / "both").exists() and not list(tmp_path.glob(".both*"))

    r = cli("export", sd, "--out", tmp_path / "ts", "--formats", "torchscript", *args)
    assert r.code == 0, r.err
    scripted = torch.jit.load(str(tmp_path / "ts" / "model.torchscript.pt"))
    eager = build_model("tests.helpers:sign_branch", {"num_classes": 3, "in_channels": 3, "image_size": [2, 2]})
    eager.load_state_dict(torch.load(sd, weights_only=True))
    eager.eval()
    for x in (torch.ones(3, 3, 2, 2), -torch.ones(3, 3, 2, 2)):  # both branches
        assert torch.allclose(scripted(x), eager(x), atol=1e-6)
    assert not torch.allclose(eager(torch.ones(1, 3, 2, 2)), -eager(-torch.ones(1, 3, 2, 2)))


def test_unscriptable_model_falls_back_to_trace_only_when_the_tracer_is_silent(tmp_path: Path, cli) -> None:
    sd = save_state_dict(tmp_path, "tests.export.models:unscriptable", [3, 4, 4], classes=2)
    r = cli(
        "export",
        sd,
        "--out",
        tmp_path / "ok",
        "--formats",
        "torchscript",
        "--model",
        "tests.export.models:unscriptable",
        "--input-shape",
        "3,4,4",
    )
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "ok" / "manifest.json").read_text())["artifacts"]["torchscript"]["method"] == "trace"

    sd = save_state_dict(tmp_path, "tests.export.models:unscriptable_branch", [3, 4, 4], classes=2)
    r = cli(
        "export",
        sd,
        "--out",
        tmp_path / "no",
        "--formats",
        "torchscript",
        "--model",
        "tests.export.models:unscriptable_branch",
        "--input-shape",
        "3,4,4",
    )
    assert r.code == 1 and "torch.jit.trace warns the trace may be wrong" in r.last_line
    assert not (tmp_path / "no").exists()


def test_jit_deprecation_warnings_stay_off_the_terminal(tiny_ckpt: Path, tmp_path: Path) -> None:
    r = run_modelship("export", str(tiny_ckpt), "--out", str(tmp_path / "b"), "--formats", "torchscript")
    assert r.code == 0, r.err
    assert "deprecated" not in r.err and "Warning" not in r.err
    assert "PASS" in r.out and "FAIL" not in r.out


def test_force_replaces_an_existing_bundle(tiny_bundle: Path, tiny_ckpt: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    (out / "stale.txt").write_text("from an older export")
    r = cli("export", tiny_ckpt, "--out", out, "--formats", "onnx")
    assert (
        r.code == 2
        and r.last_line == f"modelship export: error: --out {out} already exists; pass --force to replace it"
    )
    assert (out / "stale.txt").exists()  # untouched
    r = cli("export", tiny_ckpt, "--out", out, "--formats", "onnx", "--force")
    assert r.code == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "parity.json", "reference.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging or backup directories left


# --------------------------------------------------------------------------------------------- the gate


def test_verify_passes_an_intact_bundle(tiny_bundle: Path, cli) -> None:
    r = cli("verify", tiny_bundle)
    assert r.code == 0 and "bundle" in r.err and "verified" in r.err and "FAIL" not in r.out


def test_verify_fails_on_a_perturbed_onnx_weight_even_with_a_fixed_hash(tiny_bundle: Path, tmp_path: Path, cli) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    proto = onnx.load(str(bundle / "model.onnx"))
    init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(init).copy()
    w.flat[:16] += 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(proto, str(bundle / "model.onnx"))

    r = cli("verify", bundle)  # the hash first: a changed file is one line, exit 2, before any runtime opens it
    assert r.code == 2 and r.last_line.startswith(
        f"modelship verify: error: bundle {bundle} does not match its manifest: onnx artifact model.onnx: sha256"
    )

    rehash(bundle, "onnx")
    r = cli("verify", bundle)
    assert r.code == 1
    assert "failed verification" in r.last_line and "onnx on onnxruntime-cpu at batch" in r.last_line
    assert "torchscript" not in r.last_line  # the intact artifact is not blamed
    assert "FAIL" in r.out


def test_verify_fails_on_another_models_file_swapped_in(tiny_bundle: Path, tmp_path: Path, cli) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    other = build_model("cnn", model_kwargs("cnn", 5, [3, 32, 32], {"width": 8})).eval()
    torch.jit.script(other).save(str(bundle / "model.torchscript.pt"))
    rehash(bundle, "torchscript")
    r = cli("verify", bundle)
    assert r.code == 1 and "torchscript on torch-cpu at batch 1 (random inputs)" in r.last_line


def test_verify_needs_the_checkpoint(tiny_bundle: Path, tmp_path: Path, cli) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["source"]["checkpoint"] = str(tmp_path / "gone.pt")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    r = cli("verify", bundle)
    assert r.code == 2 and "pass --checkpoint CKPT" in r.last_line


# --------------------------------------------------------------------------------------------- bad input


def test_malicious_pickle_is_refused_and_runs_no_code(tmp_path: Path, cli) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, path)
    r = cli("export", path, "--out", tmp_path / "b")
    assert r.code == 2
    assert "needs arbitrary unpickling to load" in r.last_line and "refused" in r.last_line
    assert not marker.exists()
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda d: d / "missing.pt", [], "checkpoint {d}/missing.pt does not exist"),
        (lambda d: (d / "notes.txt").write_text("hello") and d / "notes.txt", [], "is not a PyTorch checkpoint"),
        (
            lambda d: (torch.save([1, 2, 3], d / "list.pt"), d / "list.pt")[1],
            [],
            "is neither a modelship checkpoint nor a state_dict",
        ),
        (
            lambda d: save_state_dict(d, "mlp", [3, 8, 8]),
            [],
            "is a bare state_dict: give --model and --input-shape C,H,W",
        ),
        (
            lambda d: save_state_dict(d, "mlp", [3, 8, 8]),
            ["--model", "mlp", "--input-shape", "3,16,16"],
            "does not fit the model: shape mismatches [body.1.weight [256, 192] vs model [256, 768]]",
        ),
        (
            lambda d: save_state_dict(d, "cnn", [3, 8, 8]),
            ["--model", "mlp", "--input-shape", "3,8,8"],
            "does not fit the model: missing keys [body.1.bias",
        ),
        (
            lambda d: save_state_dict(d, "mlp", [3, 8, 8]),
            ["--model", "mlp", "--input-shape", "3,8"],
            "argument --input-shape: expected C,H,W",
        ),
        (
            lambda d: save_state_dict(d, "mlp", [3, 8, 8]),
            ["--model", "mlp", "--input-shape", "3,8,8", "--classes", "a,b"],
            "--classes names 2 classes but the state_dict's head has 3 outputs",
        ),
        (
            lambda d: save_state_dict(d, "mlp", [3, 8, 8]),
            ["--formats", "onnx,tflite"],
            "--formats must name one or more of onnx, torchscript",
        ),
        (lambda d: save_state_dict(d, "mlp", [3, 8, 8]), ["--opset", "9"], "--opset must be between 18 and 23"),
    ],
    ids=[
        "missing",
        "text",
        "list",
        "bare",
        "wrong-shape",
        "wrong-model",
        "bad-shape-flag",
        "classes",
        "formats",
        "opset",
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path: Path, cli, make, extra, message: str) -> None:
    path = make(tmp_path)
    r = cli("export", path, "--out", tmp_path / "b", *extra)
    assert r.code == 2, r.err
    assert r.last_line.startswith("modelship export: error: ") and message.format(d=tmp_path) in r.last_line
    assert "Traceback" not in r.err
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_unwritable_out(tmp_path: Path, tiny_ckpt: Path, cli) -> None:
    (tmp_path / "file").write_text("x")
    r = cli("export", tiny_ckpt, "--out", tmp_path / "file" / "bundle")
    assert r.code == 2 and r.last_line.startswith(
        f"modelship export: error: cannot write the bundle to {tmp_path / 'file' / 'bundle'}"
    )
    r = cli("export", tiny_ckpt, "--out", "/proc/modelship-bundle")
    assert r.code == 2 and "cannot write the bundle to /proc/modelship-bundle" in r.last_line


@pytest.mark.gpu
def test_onnx_parity_on_the_cuda_provider(tiny_ckpt: Path, tmp_path: Path) -> None:
    bundle = export(ExportConfig(tiny_ckpt, tmp_path / "b", ExportOptions(formats=("onnx",), device="cuda")))
    runtimes = {c.runtime for c in bundle.checks}
    assert runtimes == {"onnxruntime-cpu", "onnxruntime-cuda"} and bundle.passed
