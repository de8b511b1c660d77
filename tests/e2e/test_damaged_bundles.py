"""A damaged bundle is one line in every command that opens it: an artifact changed after export (its sha256 no
longer matches) and one whose hash matches but that its runtime cannot open. Exit 2, no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from modelship.files import sha256_file
from tests.helpers import free_port, run_modelship
from tests.test_evaluate import pixels


def appended(bundle: Path) -> str:
    with open(bundle / "model.onnx", "ab") as f:
        f.write(b"x")
    return f"bundle {bundle} does not match its manifest: onnx artifact model.onnx: sha256 "


def unloadable(bundle: Path) -> str:
    (bundle / "model.onnx").write_bytes(b"not an onnx model")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["artifacts"]["onnx"] |= {"sha256": sha256_file(bundle / "model.onnx"), "bytes": 17}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return (
        "onnx artifact model.onnx: not an ONNX file (ONNX Runtime: [ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load "
        "model from model.onnx failed:Protobuf parsing failed.)"
    )


@pytest.mark.parametrize("damage", [appended, unloadable])
def test_a_damaged_artifact_is_one_line_in_every_command(affine_bundle: Path, tmp_path: Path, cli, damage) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(affine_bundle, bundle)
    what = damage(bundle)
    data = pixels(tmp_path / "data")
    image = next((data / "a").iterdir())
    commands = {
        "verify": ["verify", bundle],
        "predict": ["predict", "--bundle", bundle, image],
        "evaluate": ["evaluate", bundle, "--data", data, "--out", tmp_path / "ev"],
        "triton": ["triton", bundle, "--out", tmp_path / "triton"],
    }
    expected = what if damage is appended else f"bundle {bundle}: {what}"
    for name, args in commands.items():
        r = cli(*args)
        assert r.code == 2 and "Traceback" not in r.err, (name, r.err[-3000:])
        assert r.last_line.startswith(f"modelship {name}: error: {expected}"), (name, r.last_line)
    assert not (tmp_path / "ev").exists() and not (tmp_path / "triton").exists() and r.out == ""

    served = run_modelship("serve", str(bundle), "--port", str(free_port()), timeout=120)
    if damage is unloadable:  # the hash matches: refused once a worker's runtime could not open it
        expected = f"bundle {bundle} (affine/1) cannot be served: {what}"
    assert served.code == 2 and "Traceback" not in served.err, served.err[-3000:]
    assert served.last_line.startswith(f"modelship serve: error: {expected}"), served.last_line
