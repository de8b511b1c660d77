"""`modelship evaluate`: exact counts on a fixed-weight model, an independent recount from the ONNX file, the files it
writes, and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from modelship.imagefolder import scan_folder
from modelship.preprocess import Preprocess, preprocess_image

# The affine bundle's logits are 2x + 1 over the 4 pixels of a 1x2x2 image: the brightest pixel is the prediction.
# (true class, brightest pixel) -> how many images: a-d are classes 0-3 and pixels 0-3.
PLANTED = {("a", 0): 3, ("a", 2): 1, ("b", 1): 2, ("b", 3): 2, ("c", 2): 4, ("d", 3): 1, ("d", 0): 1}
EXPECTED = [[3, 0, 1, 0], [0, 2, 0, 2], [0, 0, 4, 0], [1, 0, 0, 1]]  # rows true a-d, columns predicted a-d


def pixels(folder: Path, planted: dict[tuple[str, int], int] = PLANTED) -> Path:
    """2x2 grayscale PNGs: one pixel at 200, the others at 10, 20, 30 (so each logit is distinct)."""
    for (cls, hot), count in planted.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            values = [10 + 10 * ((j - hot) % 4) for j in range(4)]
            values[hot] = 200 + i
            Image.fromarray(np.asarray(values, np.uint8).reshape(2, 2), "L").save(folder / cls / f"{hot}-{i}.png")
    return folder


def test_the_confusion_matrix_is_exact_on_a_fixed_weight_model(affine_bundle: Path, tmp_path: Path, cli) -> None:
    data = pixels(tmp_path / "data" / "val")  # a val/ subfolder is used when there is one
    r = cli("evaluate", affine_bundle, "--data", tmp_path / "data", "--out", tmp_path / "ev", "--batch-size", "3")
    assert r.code == 0, r.err
    ev = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert ev["confusion_matrix"] == EXPECTED and ev["classes"] == ["a", "b", "c", "d"]
    assert (ev["backend"], ev["n"], ev["data"]) == ("onnx", 14, str(data))
    assert ev["accuracy"] == pytest.approx(10 / 14, abs=1e-6)
    assert ev["per_class"]["a"] == {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    assert ev["per_class"]["b"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3, abs=1e-6), "support": 4}
    assert ev["per_class"]["d"] == {"precision": pytest.approx(1 / 3, abs=1e-6), "recall": 0.5,
                                    "f1": pytest.approx(0.4, abs=1e-6), "support": 2}  # fmt: skip
    assert 0 <= ev["ece"] <= 1 and ev["images_per_s"] > 0 and ev["seconds"] > 0
    assert f"evaluating onnx on {data} (14 images)" in r.err
    assert r.out.splitlines()[1].split()[:3] == ["onnx", "14", f"{10 / 14:.4f}"]
    assert (tmp_path / "ev" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "ev" / "report.html").read_text()
    cells = [int(c) for c in re.findall(r'<td style="[^"]*">(\d+)</td>', page)]
    assert cells == [v for row in EXPECTED for v in row]


def test_an_independent_recount_from_the_onnx_file_agrees(
    tiny_bundle: Path, tiny_ckpt: Path, tmp_path: Path, cli
) -> None:
    from modelship.training.checkpoint import load_checkpoint

    val = Path(load_checkpoint(tiny_ckpt)["data"]["source"]["root"]) / "val"
    r = cli("evaluate", tiny_bundle, "--data", val, "--out", tmp_path, "--backend", "onnx", "--backend", "pt2")
    assert r.code == 0, r.err
    ev = json.loads((tmp_path / "evaluation.json").read_text())
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    classes, samples = scan_folder(val, "val")
    pre = Preprocess.from_dict(manifest["preprocess"])
    x = np.stack([preprocess_image(Image.open(p), pre) for p, _ in samples])
    session = ort.InferenceSession(str(tiny_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    pred = session.run(None, {"input": x})[0].argmax(1)
    expected = np.zeros((5, 5), int)
    for (_, label), p in zip(samples, pred, strict=True):
        expected[manifest["classes"].index(classes[label]), p] += 1
    assert ev["confusion_matrix"] == expected.tolist()
    (pt2,) = ev["comparisons"]
    assert pt2["backend"] == "pt2" and pt2["confusion_matrix"] == ev["confusion_matrix"] and pt2["accuracy_delta"] == 0


def unknown_classes(d: Path) -> None:
    pixels(d, {("a", 0): 1, ("zebra", 1): 1, ("yak", 2): 1})


def empty_class(d: Path) -> None:
    pixels(d, {("a", 0): 1})
    (d / "b").mkdir()


def unreadable_image(d: Path) -> None:
    pixels(d)
    (d / "a" / "bad.png").write_bytes(b"nope")


SETUPS = {"unknown": unknown_classes, "no-classes": lambda d: None, "no-images": lambda d: (d / "a").mkdir(),
          "empty-class": empty_class, "unreadable": unreadable_image, "fine": pixels}  # fmt: skip


@pytest.mark.parametrize(("setup", "extra", "message"), [
    ("unknown", [], "has class folders the bundle does not know: yak, zebra; its classes are a, b, c, d"),
    ("no-classes", [], "has no class sub-folders"),
    ("no-images", [], "has class folders but no images"),
    ("empty-class", [], "class folder(s) b contain no images"),
    ("unreadable", [], "images in --data {data} cannot be used: cannot read image {data}/a/bad.png"),
    ("fine", ["--backend", "onnx-int8"], "--backend onnx-int8: bundle "),
    ("fine", ["--backend", "tflite"], "--backend must name one or more of onnx, onnx-fp16"),
])  # fmt: skip
def test_bad_evaluate_input_is_one_line_exit_2(
    affine_bundle: Path, tmp_path: Path, cli, setup: str, extra: list[str], message: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    SETUPS[setup](data)
    r = cli("evaluate", affine_bundle, "--data", data, "--out", tmp_path / "ev", *extra)
    assert r.code == 2 and r.last_line.startswith("modelship evaluate: error: "), r.err
    assert message.format(data=data) in r.last_line, r.last_line
    assert "Traceback" not in r.err and not (tmp_path / "ev").exists()
