"""Where the rollout's --min-agreement default comes from: the top-1 agreement of models that should pass (the same
model trained again with another seed) and of models that should not (the same answers under permuted class names,
a model trained far shorter), on real image folders, through the shipped ONNX artifacts as the server runs them.

    python benchmarks/agreement_bench.py [--seeds 4] [--epochs 5]

Each model is `modelship train` on the built-in shapes data (2,000 / 500 images, as `make run`) then `modelship
export`; shapes draws its images from the training's --seed, so two trainings differ in their data as well as their
initialization and order. Agreement is measured on three sets of folders: the validation splits of every training,
fresh shapes images from another generator seed (never seen in training), and those images brightened by 25 levels
(live traffic that drifted a little).
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelship.backends import load_backend
from modelship.cli import main as cli
from modelship.manifest import check_bundle
from modelship.preprocess import Preprocess, preprocess_image
from modelship.training.shapes import ensure_shapes


def trained(root: Path, data: Path, name: str, seed: int, epochs: int) -> Path:
    """A bundle of the cnn trained on shapes with `seed` for `epochs`."""
    run = root / name
    args = ["--data", "shapes", "--data-dir", str(data), "--epochs", str(epochs), "--seed", str(seed)]
    assert cli(["train", "--out", str(run), *args]) == 0
    assert cli(["export", str(run / "checkpoints" / "best.pt"), "--out", str(run / "bundle"), "--formats", "onnx"]) == 0
    return run / "bundle"


def labels(bundle: Path, images: list[Image.Image]) -> np.ndarray:
    """Each image's top-1 class name through the bundle's ONNX artifact and its own preprocessing."""
    manifest = check_bundle(bundle)
    pre = Preprocess.from_dict(manifest["preprocess"])
    run = load_backend("onnx", bundle / manifest["artifacts"]["onnx"]["path"], "cpu", 2)
    x = np.stack([preprocess_image(im, pre) for im in images])
    top = np.concatenate([run(x[i : i + 256]) for i in range(0, len(x), 256)]).argmax(axis=1)
    return np.asarray(manifest["classes"])[top]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=4, help="trainings of the same model (default 4)")
    p.add_argument("--epochs", type=int, default=5, help="as make run (default 5)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, data = Path(tmp), Path(tmp) / "data"
        bundles = {f"seed {s}": trained(root, data, f"s{s}", s, args.epochs) for s in range(args.seeds)}
        bundles["1 epoch, seed 9"] = trained(root, data, "short", 9, 1)
        fresh_root = ensure_shapes(root / "fresh", seed=12345, train=1, val=2000)
        folders = {
            "validation splits": [Image.open(f).convert("RGB") for f in sorted(data.rglob("val/*/*.png"))],
            "fresh shapes": [Image.open(f).convert("RGB") for f in sorted((fresh_root / "val").rglob("*.png"))],
        }
        folders["fresh, brightened +25"] = [
            Image.fromarray(np.clip(np.asarray(im, np.int16) + 25, 0, 255).astype(np.uint8))
            for im in folders["fresh shapes"]
        ]
        answers = {name: {f: labels(b, ims) for f, ims in folders.items()} for name, b in bundles.items()}
    print(f"machine: {platform.machine()}; {args.seeds} trainings of the cnn, {args.epochs} epochs each")
    print(f"images: {', '.join(f'{f} {len(ims)}' for f, ims in folders.items())}\n")
    print(f"{'pair':34}" + "".join(f"{f:>24}" for f in folders))
    rows = []
    seeds = [n for n in answers if n.startswith("seed")]
    for a, b in itertools.combinations(seeds, 2):
        rows.append((f"{a} / {b}", [float((answers[a][f] == answers[b][f]).mean()) for f in folders]))
    for other in ("1 epoch, seed 9",):
        rows.append((f"seed 0 / {other}", [float((answers["seed 0"][f] == answers[other][f]).mean()) for f in folders]))
    names = sorted(set(answers["seed 0"]["validation splits"]))
    permutation = {n: names[(i + 1) % len(names)] for i, n in enumerate(names)}  # every class to another name
    permuted = [float((answers["seed 0"][f] == np.vectorize(permutation.get)(answers["seed 0"][f])).mean())
                for f in folders]  # fmt: skip
    rows.append(("seed 0 / itself, classes permuted", permuted))
    for name, values in rows:
        print(f"{name:34}" + "".join(f"{v:>24.4f}" for v in values))
    same = [v for name, values in rows if name.count("seed") == 2 and "epoch" not in name for v in values]
    print(f"\nretrained pairs: lowest agreement {min(same):.4f}, median {float(np.median(same)):.4f}")


if __name__ == "__main__":
    main()
