"""The tutorial training loop, as a standalone process: the baseline `benchmarks/train_bench.py` measures against.

    python benchmarks/tutorial_train.py FOLDER --epochs 5 [--device cpu|cuda]

torchvision ImageFolder (FOLDER/train, FOLDER/val) with ToTensor + Normalize(0.5, 0.5) (and Grayscale for a grayscale
folder), a DataLoader with its defaults (shuffle, batch 64, no workers), Adam at 1e-3, cross-entropy, no schedule, no
augmentation, no AMP; the model is the registry's `cnn`, as `modelship train` builds it. Prints one JSON line: the
best validation accuracy and the training samples/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelship.training.models import build_model, model_kwargs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    first = next((args.folder / "train").rglob("*.*"))
    gray = Image.open(first).mode == "L"
    steps = [transforms.Grayscale(1)] if gray else []
    channels = 1 if gray else 3
    transform = transforms.Compose(
        [*steps, transforms.ToTensor(), transforms.Normalize((0.5,) * channels, (0.5,) * channels)]
    )
    train_set = datasets.ImageFolder(str(args.folder / "train"), transform=transform)
    val_set = datasets.ImageFolder(str(args.folder / "val"), transform=transform)
    train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=64)
    size = list(train_set[0][0].shape[1:])
    model = build_model("cnn", model_kwargs("cnn", len(train_set.classes), [channels, *size], {})).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    seconds, seen, best = 0.0, 0, 0.0
    for _ in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            seen += len(y)
        seconds += time.perf_counter() - t0
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
        best = max(best, correct / len(val_set))
    print(json.dumps({"best_val_acc": best, "samples_per_s": seen / seconds}))


if __name__ == "__main__":
    main()
