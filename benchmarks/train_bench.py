"""`modelship train` with its defaults against the tutorial loop, whole processes, side by side in one run.

    python benchmarks/train_bench.py [--epochs 5] [--rounds 3] [--device cpu|cuda] [--folders gray,photo]

Two folders, written once (deterministic) under --work: `gray`, small grayscale PNGs (28x28, 3000 train / 600 val,
MNIST-sized), and `photo`, RGB JPEG photographs of the shapes (64x64, 1500 / 300). On each, every round runs as
separate processes, in turn: the tutorial loop (benchmarks/tutorial_train.py), `modelship train` with a fresh
decoded-data cache (cold: it decodes and caches), and `modelship train` again (warm: the cache is there). The same
model (the registry's `cnn`), the same epochs; wall time is the whole process, imports and start-up included.
Medians over the rounds, ratios against the tutorial, best validation accuracy of each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
FOLDERS = {"gray": (28, 3000, 600, "L", "png"), "photo": (64, 1500, 300, "RGB", "jpg")}


def write_folder(root: Path, name: str) -> Path:
    """The benchmark's folder `name`, drawn with the shapes generator (deterministic), unless it is there."""

    from modelship.training.shapes import CLASSES, _draw

    size, n_train, n_val, mode, ext = FOLDERS[name]
    out = root / name
    if (out / "DONE").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    for split, n in (("train", n_train), ("val", n_val)):
        rng = np.random.default_rng([7, split == "val"])
        for c in CLASSES:
            (out / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            kind = CLASSES[i % len(CLASSES)]
            image = _draw(kind, rng, size).convert(mode)
            image.save(out / split / kind / f"{i:05d}.{ext}", **({"quality": 90} if ext == "jpg" else {}))
    (out / "DONE").write_text("ok\n")
    return out


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stdout


def tutorial(folder: Path, args: argparse.Namespace) -> dict:
    wall, out = timed([sys.executable, "benchmarks/tutorial_train.py", str(folder), "--epochs", str(args.epochs),
                       "--device", args.device])  # fmt: skip
    return {"wall_s": wall, "best_val_acc": json.loads(out)["best_val_acc"]}


def modelship(folder: Path, cache: Path, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as run:
        wall, _ = timed([sys.executable, "-m", "modelship.cli", "train", "--data", str(folder), "--model", "cnn",
                         "--epochs", str(args.epochs), "--device", args.device, "--cache-dir", str(cache),
                         "--out", run])  # fmt: skip
        rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "best_val_acc": max(r["val_acc"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--folders", default="gray,photo")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "modelship-train-bench")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    results: dict[tuple[str, str], list[dict]] = {}
    for name in args.folders.split(","):
        folder = write_folder(args.work, name)
        for _ in range(args.rounds):
            cache = args.work / f"cache-{name}"
            shutil.rmtree(cache, ignore_errors=True)
            results.setdefault((name, "tutorial loop"), []).append(tutorial(folder, args))
            results.setdefault((name, "modelship train, cold cache"), []).append(modelship(folder, cache, args))
            results.setdefault((name, "modelship train, warm cache"), []).append(modelship(folder, cache, args))
    report(results, args)


def report(results: dict[tuple[str, str], list[dict]], args: argparse.Namespace) -> None:
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, device {args.device}")
    print(f"registry cnn, {args.epochs} epochs, whole-process wall time, median of {args.rounds} alternated rounds\n")
    print(f"{'folder':<7} {'trainer':<29} {'wall s':>7} {'speed-up':>9} {'best val_acc':>13}  (wall s per round)")
    rows = []
    for (name, trainer), runs in results.items():
        wall = statistics.median(r["wall_s"] for r in runs)
        base = statistics.median(r["wall_s"] for r in results[(name, "tutorial loop")])
        acc = statistics.median(r["best_val_acc"] for r in runs)
        each = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
        print(f"{name:<7} {trainer:<29} {wall:>7.1f} {base / wall:>8.2f}x {acc:>13.4f}  ({each})")
        rows.append({"folder": name, "trainer": trainer, "wall_s": wall, "speedup": base / wall, "best_val_acc": acc,
                     "rounds": runs})  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
