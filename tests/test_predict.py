"""`modelship predict`: offline with a bundle, remotely over v2 with the bundle's preprocessing, or through a server's
/predict — the same answers every way, in TSV, CSV or JSON lines."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from modelship.devices import cuda_device_count
from modelship.training.checkpoint import load_checkpoint
from tests.helpers import Server, run_modelship


def val_folder(tiny_ckpt: Path) -> Path:
    return Path(load_checkpoint(tiny_ckpt)["data"]["source"]["root"]) / "val"


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_offline_remote_v2_and_server_predict_give_the_same_answers(
    server: Server, tiny_bundle: Path, tiny_ckpt: Path
) -> None:
    val = val_folder(tiny_ckpt)
    images = [str(p) for p in sorted(val.rglob("*.png"))[::5]]  # 5 images, across the classes
    offline = run_modelship("predict", "--bundle", str(tiny_bundle), *images, "--format", "jsonl", "--top-k", "3")
    remote = run_modelship("predict", "--bundle", str(tiny_bundle), "--url", server.url, *images, "--format", "jsonl",
                           "--top-k", "3")  # fmt: skip
    served = run_modelship("predict", "--url", server.url, *images, "--format", "jsonl", "--top-k", "3")
    rows = [jsonl(r.out) for r in (offline, remote, served)]
    assert all(r.code == 0 for r in (offline, remote, served)), [r.err for r in (offline, remote, served)]
    assert [row["path"] for row in rows[0]] == images
    for a, b, c in zip(*rows, strict=True):
        assert a["label"] == b["label"] == c["label"] and a["index"] == b["index"] == c["index"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-6) and a["score"] == pytest.approx(c["score"], abs=1e-6)
        assert [t["label"] for t in a["top_k"]] == [t["label"] for t in c["top_k"]] and len(a["top_k"]) == 3


def test_folders_batches_csv_and_an_output_file(tiny_bundle: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    val = val_folder(tiny_ckpt)
    out = tmp_path / "predictions.csv"
    r = run_modelship("predict", "--bundle", str(tiny_bundle), str(val), "--format", "csv", "--output", str(out),
                      "--batch-size", "7", "--backend", "pt2")  # fmt: skip
    assert r.code == 0, r.err
    assert r.last_line == f"25 prediction(s) written to {out}"
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 25 and [r["path"] for r in rows] == sorted(str(p) for p in val.rglob("*.png"))
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    for row in rows:
        top = [part.split(":") for part in row["top_k"].split("|")]
        assert row["label"] == manifest["classes"][int(row["index"])] == top[0][0]
        assert float(row["score"]) == pytest.approx(float(top[0][1]), abs=1e-6)
        assert len(top) == 5 and [float(s) for _, s in top] == sorted((float(s) for _, s in top), reverse=True)
    tsv = run_modelship("predict", "--bundle", str(tiny_bundle), str(val / "circle"))
    assert tsv.code == 0 and len(tsv.out.splitlines()) == 5 and tsv.out.splitlines()[0].count("\t") == 3


@pytest.mark.parametrize(("args", "message"), [
    (["{bundle}", "/no/such.png"], "image /no/such.png does not exist"),
    (["{bundle}", "{bad}"], "1 of the 1 images cannot be used: cannot read image {bad}"),
    (["{bundle}", "{empty}"], "folder {empty} has no images"),
    (["{bundle}", "{val}", "--backend", "onnx-int8"], "has no onnx-int8 artifact"),
    pytest.param(["{bundle}", "{val}", "--device", "cuda"], "--device cuda but no CUDA device is usable here",
                 marks=pytest.mark.skipif(cuda_device_count() > 0, reason="checks the message without a GPU")),
])  # fmt: skip
def test_bad_predict_input_is_one_line_exit_2_and_no_output(
    tiny_bundle: Path, tiny_ckpt: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "empty").mkdir()
    names = {
        "bundle": tiny_bundle,
        "bad": tmp_path / "bad.png",
        "empty": tmp_path / "empty",
        "val": val_folder(tiny_ckpt),
    }
    argv = [a.format(**names) for a in args]
    r = run_modelship("predict", "--bundle", *argv, "--output", str(tmp_path / "out.csv"))
    assert (r.code == 2 and r.last_line == f"modelship predict: error: {message.format(**names)}") or (
        r.code == 2 and message.format(**names) in r.last_line
    ), r.err
    assert "Traceback" not in r.err and not (tmp_path / "out.csv").exists()
    r = run_modelship("predict", "/no/such.png")
    assert r.code == 2 and "give --url (a running server), --bundle (offline), or both" in r.last_line
