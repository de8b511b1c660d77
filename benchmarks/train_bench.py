"""`modelship train` against a plain PyTorch loop as the tutorials write it, on the same data, model and epochs.

    python benchmarks/train_bench.py [--epochs 5] [--device cpu|cuda] [--repeat 1] [--amp bf16]

The plain loop: torchvision ImageFolder with ToTensor + Normalize(0.5, 0.5), a DataLoader with its defaults
(shuffle, batch 64, no workers), Adam at 1e-3, cross-entropy, no schedule, no augmentation, no AMP. Both train the
registry's `cnn` on the same `shapes` folder; the table gives training samples/s, wall time and final val accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelship.training.config import TrainConfig
from modelship.training.data import default_data_dir
from modelship.training.models import build_model, model_kwargs
from modelship.training.shapes import ensure_shapes
from modelship.training.train import train


def plain_loop(root: Path, epochs: int, device: torch.device) -> dict:
    """The tutorial loop, timed the same way modelship times itself (training passes only for samples/s)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    start = time.perf_counter()
    torch.manual_seed(0)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    train_set = datasets.ImageFolder(str(root / "train"), transform=transform)
    val_set = datasets.ImageFolder(str(root / "val"), transform=transform)
    train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=64)
    model = build_model("cnn", model_kwargs("cnn", len(train_set.classes), [3, 32, 32], {})).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    train_seconds, seen, acc = 0.0, 0, 0.0
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            seen += len(y)
        train_seconds += time.perf_counter() - t0
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        acc = correct / len(val_set)
    return {"samples_per_s": seen / train_seconds, "wall_s": time.perf_counter() - start, "val_acc": acc}


def modelship_train(data_dir: Path, epochs: int, device: str, amp: str, out: Path) -> dict:
    start = time.perf_counter()
    train(TrainConfig(out=out, data="shapes", data_dir=data_dir, model="cnn", epochs=epochs, device=device, amp=amp))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_seconds = sum(r["seconds"] for r in rows)  # includes validation: a conservative samples/s
    n = sum(r["samples_per_s"] * r["seconds"] for r in rows)
    return {"samples_per_s": n / train_seconds, "wall_s": time.perf_counter() - start, "val_acc": rows[-1]["val_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="for modelship only")
    parser.add_argument("--repeat", type=int, default=1, help="alternating rounds; medians are reported")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    args = parser.parse_args()
    root = ensure_shapes(args.data_dir, seed=0, train=2000, val=500)
    results: dict[str, list[dict]] = {"plain PyTorch loop": [], f"modelship train (amp {args.amp})": []}
    for _ in range(args.repeat):
        results["plain PyTorch loop"].append(plain_loop(root, args.epochs, torch.device(args.device)))
        with tempfile.TemporaryDirectory() as tmp:
            key = f"modelship train (amp {args.amp})"
            results[key].append(modelship_train(args.data_dir, args.epochs, args.device, args.amp, Path(tmp)))
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, device {args.device}")
    print(f"shapes 2000 train / 500 val, cnn, {args.epochs} epochs, batch 64; median of {args.repeat} round(s)\n")
    print(f"{'trainer':<28} {'samples/s':>10} {'wall s':>8} {'val_acc':>8}")
    base = None
    for name, runs in results.items():
        sps = statistics.median(r["samples_per_s"] for r in runs)
        wall = statistics.median(r["wall_s"] for r in runs)
        acc = statistics.median(r["val_acc"] for r in runs)
        base = base or sps
        print(f"{name:<28} {sps:>10.1f} {wall:>8.1f} {acc:>8.4f}   {sps / base:.2f}x samples/s")


if __name__ == "__main__":
    main()
