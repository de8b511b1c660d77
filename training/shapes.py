"""The built-in `shapes` dataset: procedurally drawn RGB images written as an ImageFolder of PNG files.

Everything is a function of (seed, counts, size), so the same arguments always give byte-identical files, and
the folder is built in a temporary directory and renamed into place, so a killed run never leaves half of it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "cross", "ring", "square", "triangle")
FORMAT_VERSION = 1


def _draw(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    noise = rng.normal(0, 18, (size, size, 3))
    base = rng.integers(0, 256, 3)
    background = np.clip(base + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    # a colour far enough from the background that the shape is visible
    while True:
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - base).sum() > 180:
            break
    fill = (int(colour[0]), int(colour[1]), int(colour[2]))
    r = rng.uniform(0.22, 0.4) * size
    cx = rng.uniform(r + 1, size - r - 1)
    cy = rng.uniform(r + 1, size - r - 1)
    width = max(2, round(r / 3))
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=width)
    elif kind == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif kind == "triangle":
        angle = rng.uniform(0, 2 * math.pi)
        points = [
            (cx + r * math.cos(angle + k * 2 * math.pi / 3), cy + r * math.sin(angle + k * 2 * math.pi / 3))
            for k in range(3)
        ]
        draw.polygon(points, fill=fill)
    elif kind == "cross":
        draw.rectangle((cx - r, cy - width / 2, cx + r, cy + width / 2), fill=fill)
        draw.rectangle((cx - width / 2, cy - r, cx + width / 2, cy + r), fill=fill)
    else:  # pragma: no cover - CLASSES is fixed
        raise AssertionError(kind)
    return image


def _write_split(root: Path, split: str, count: int, seed: int, size: int) -> None:
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    for name in CLASSES:
        (root / split / name).mkdir(parents=True)
    for i in range(count):
        kind = CLASSES[i % len(CLASSES)]
        _draw(kind, rng, size).save(root / split / kind / f"{i:06d}.png", optimize=False)


def shapes_dir(cache_dir: Path, *, seed: int, train: int, val: int, size: int) -> Path:
    """Where the dataset for these parameters lives inside `cache_dir`."""
    key = json.dumps({"v": FORMAT_VERSION, "seed": seed, "train": train, "val": val, "size": size}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir / f"shapes-{digest}"


def ensure_shapes(cache_dir: Path, *, seed: int, train: int, val: int, size: int = 32) -> Path:
    """Write the dataset (train/ and val/ ImageFolders) unless it is already there; return its root."""
    root = shapes_dir(cache_dir, seed=seed, train=train, val=val, size=size)
    if (root / "DONE").is_file():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=cache_dir))
    try:
        _write_split(tmp, "train", train, seed, size)
        _write_split(tmp, "val", val, seed, size)
        (tmp / "DONE").write_text(json.dumps({"classes": list(CLASSES), "train": train, "val": val}) + "\n")
        try:
            os.replace(tmp, root)
        except OSError:
            # another process (a DDP rank, a parallel run) finished first: its copy is identical
            if not (root / "DONE").is_file():
                if root.exists():
                    shutil.rmtree(root)
                os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
