"""Where live drift's thresholds come from: the drift figures (modelship.reference, exactly as the server computes
them) of many windows of in-distribution traffic, and of shifted traffic, for a bundle and its reference.

    python benchmarks/drift_bench.py --bundle runs/quickstart/bundle [--window 1000] [--windows 40]

In-distribution traffic is fresh `shapes` images (the same generator, another seed: never seen in training or in the
reference). The shifts: the same images brightened and darkened by a few levels, one class only, grayscale versions,
and images of another kind (uniform noise; flat colours). For each stream and figure it prints the median and the
99th percentile over the windows, and the status the default thresholds give: the defaults sit well above what
in-distribution windows reach, and below what a shift people would want to hear about reaches.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelship import reference
from modelship.backends import load_backend
from modelship.manifest import check_bundle
from modelship.options import Thresholds
from modelship.preprocess import Preprocess, preprocess_image
from modelship.training.shapes import CLASSES, ensure_shapes

Stream = Callable[[Image.Image, np.random.Generator], Image.Image]


def brighten(levels: int) -> Stream:
    return lambda im, _: Image.fromarray(np.clip(np.asarray(im, np.int16) + levels, 0, 255).astype(np.uint8))


STREAMS: dict[str, Stream | None] = {
    "in-distribution (fresh shapes)": None,
    "brightened +10": brighten(10),
    "brightened +25": brighten(25),
    "brightened +50": brighten(50),
    "darkened -25": brighten(-25),
    "grayscale": lambda im, _: im.convert("L").convert("RGB"),
    "one class only (circles)": None,
    "uniform noise": lambda im, rng: Image.fromarray(rng.integers(0, 256, (*im.size, 3), dtype=np.uint8)),
    "flat colours": lambda im, rng: Image.new("RGB", im.size, tuple(int(v) for v in rng.integers(0, 256, 3))),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--window", type=int, default=1000)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--images", type=int, default=4000, help="fresh in-distribution images drawn")
    args = p.parse_args()
    manifest = check_bundle(args.bundle)
    ref = reference.read(args.bundle, manifest)
    assert ref is not None, "the bundle has no reference.json: re-export it"
    pre = Preprocess.from_dict(manifest["preprocess"])
    run = load_backend("onnx", args.bundle / manifest["artifacts"]["onnx"]["path"], "cpu", 2)
    with tempfile.TemporaryDirectory() as tmp:
        root = ensure_shapes(Path(tmp), seed=12345, train=1, val=args.images)  # another seed than training's
        files = sorted((root / "val").rglob("*.png"))
        images = [(Image.open(f).convert("RGB"), f.parent.name) for f in files]
    rng = np.random.default_rng(0)
    defaults = Thresholds()
    print(f"machine: {platform.machine()}, {platform.node()}; bundle {args.bundle}; reference: {ref['images']} images")
    print(f"{args.windows} windows of {args.window} answers per stream; median / 99th percentile over the windows\n")
    head = f"{'stream':32} {'PSI':>15} {'low-conf share':>17} {'max shift (sd)':>17} {'mean conf':>10}  statuses"
    print(head)
    for name, change in STREAMS.items():
        pool = [im for im, cls in images if cls == CLASSES[0]] if "one class" in name else [im for im, _ in images]
        x = np.stack([preprocess_image(change(im, rng) if change else im, pre) for im in pool])
        logits = np.concatenate([run(x[i : i + 64]) for i in range(0, len(x), 64)])
        pred, conf = reference.top1(logits)
        means = x.mean(axis=(2, 3), dtype=np.float64)
        rows = []
        for _ in range(args.windows):
            pick = rng.integers(0, len(x), args.window)
            fig = reference.figures(ref, pred[pick], conf[pick], means[pick])
            rows.append((fig, reference.judge(fig, defaults)[0]))
        psi = np.array([f["psi"] for f, _ in rows])
        low = np.array([f["low_confidence_share"] for f, _ in rows])
        shift = np.array([max(f["channel_shift"]) for f, _ in rows])
        mean_conf = np.array([f["mean_confidence"] for f, _ in rows])
        statuses = {s: sum(1 for _, st in rows if st == s) for s in ("ok", "warn", "drift")}

        def cell(v: np.ndarray) -> str:
            return f"{np.median(v):.3f} / {np.quantile(v, 0.99):.3f}"

        print(f"{name:32} {cell(psi):>15} {cell(low):>17} {cell(shift):>17} {np.median(mean_conf):>10.3f}  {statuses}")
    print(f"\ndefaults: PSI {defaults.psi}, low-confidence share {defaults.low_confidence}, shift {defaults.shift}")


if __name__ == "__main__":
    main()
