"""A first look at a folder's files before training: every header read once, the channels and size to train at."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from modelship.errors import DataError
from modelship.imagefolder import GRAY_MODES, open_header, raise_bad, undecodable
from modelship.preprocess import orientation

STATS_SAMPLE = 2000  # training files whose modes and sizes (and, in data.py, mean/std) are measured
INSPECT_VERSION = 1  # raise when what inspect_images answers for the same files changes: its cached answers go


def sample(items: Sequence[Any], seed: int) -> list[Any]:
    """Up to STATS_SAMPLE of `items`, a seeded choice, in their order."""
    if len(items) <= STATS_SAMPLE:
        return list(items)
    idx = np.random.default_rng(seed).permutation(len(items))[:STATS_SAMPLE]
    return [items[i] for i in sorted(idx)]


def inspect_images(train: Sequence[str], others: Sequence[str], seed: int) -> tuple[int, tuple[int, int], str]:
    """Open every file's header once, so every file that is not an image (or is over the pixel limit) fails now, all
    of them by name, not one per run in epoch 3; the channel count and the training size come from the same seeded
    sample of training files the mean/std use. Returns (channels, (H, W), why that size)."""
    sampled = set(sample(train, seed))
    modes: Counter[str] = Counter()
    sizes: Counter[tuple[int, int]] = Counter()
    bad = []
    for p in [*train, *others]:
        try:
            with open_header(p) as im:
                if p in sampled:
                    modes[im.mode] += 1
                    turned = orientation(im) in (5, 6, 7, 8)  # stored on its side: W and H swap
                    h, w = (im.width, im.height) if turned else (im.height, im.width)
                    sizes[(h, w)] += 1
        except DataError as e:
            bad.append(str(e))
    if bad:  # decode every file too: a truncated one is named in the same error as one that is not an image
        raise_bad(undecodable([*train, *others]), len(train) + len(others), "images")
    channels = 1 if set(modes) <= GRAY_MODES else 3
    return (channels, *training_size(sizes))


def training_size(sizes: Counter[tuple[int, int]]) -> tuple[tuple[int, int], str]:
    """The (H, W) to train at without --image-size: the images' own when they share one; for varied sizes a square
    of their median shorter side, capped at 224 (timm's and torchvision's default) and rounded to a multiple of 8
    (a size only a few images had, such as 83x141, distorts every other one)."""
    (common, count), total = sizes.most_common(1)[0], sum(sizes.values())
    if len(sizes) == 1:
        return common, ""
    shorter = sorted(min(hw) for hw, n in sizes.items() for _ in range(n))[total // 2]
    side = max(8, min(224, round(shorter / 8) * 8))
    why = (f"images vary in size ({len(sizes)} sizes in {total} sampled, the most common {common[0]}x{common[1]} in "
           f"{count}): training at {side}x{side}, the median shorter side; --image-size H,W sets it")  # fmt: skip
    return (side, side), why
