"""Data order and loaders: every epoch's order is a function of (seed, epoch) alone, sharded by rank."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from modelship.errors import DataError
from modelship.training.config import TrainConfig
from modelship.training.data import LabelledDataset
from modelship.training.runtime import Dist


class EpochSampler(Sampler[int]):
    """Indices for one epoch, a function of (seed, epoch) only: shuffled, class-balanced, or in order; sharded by rank.

    Training shards are padded by wrapping so every rank runs the same number of steps (DDP needs that);
    evaluation shards are not, so every validation image counts exactly once.
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int,
        shuffle: bool,
        weights: torch.Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ):
        self.n, self.seed, self.shuffle, self.weights = n, seed, shuffle, weights
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            idx = torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        elif self.shuffle:
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        if self.pad and self.world_size > 1 and len(idx) % self.world_size:
            idx += idx[: self.world_size - len(idx) % self.world_size]
        return idx[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.n / self.world_size)
        return len(range(self.rank, self.n, self.world_size))


def class_weights(targets: list[int]) -> torch.Tensor:
    """Per-sample weights 1/count(class): every class is drawn equally often."""
    t = torch.tensor(targets)
    counts = torch.bincount(t).clamp(min=1).double()
    return (1.0 / counts)[t]


def make_loaders(
    cfg: TrainConfig, train_ds: LabelledDataset, val_ds: LabelledDataset, dist: Dist, device: torch.device
) -> tuple[DataLoader, DataLoader, EpochSampler]:
    """The training loader (its sampler is set per epoch) and the validation loader, this rank's shard of each."""
    workers = (
        cfg.workers
        if cfg.workers is not None
        else (min(8, (os.cpu_count() or 1) // dist.world_size) if device.type == "cuda" else 0)
    )
    weights = class_weights(train_ds.targets) if cfg.balanced_sampler else None
    train_sampler = EpochSampler(
        len(train_ds), seed=cfg.seed, shuffle=True, weights=weights, rank=dist.rank, world_size=dist.world_size
    )
    val_sampler = EpochSampler(
        len(val_ds), seed=cfg.seed, shuffle=False, rank=dist.rank, world_size=dist.world_size, pad=False
    )
    common: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": False}
    # The generator seeds worker RNGs (augmentation); it is reseeded from (seed, epoch) before every epoch.
    train_loader = DataLoader(
        train_ds, batch_size=cfg.batch_size, sampler=train_sampler, generator=torch.Generator(), **common
    )
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size * 2, sampler=val_sampler, **common)
    return train_loader, val_loader, train_sampler


def start_epoch(loader: DataLoader, sampler: EpochSampler, seed: int, epoch: int) -> None:
    """Data order and augmentation RNG for `epoch`: a function of (seed, epoch) only, so resume is exact."""
    sampler.set_epoch(epoch)
    assert loader.generator is not None
    loader.generator.manual_seed(seed * 7919 + epoch)


def batches(loader: DataLoader) -> Iterator[Any]:
    """Iterate a loader; a DataError raised in a worker comes back as the one line it said, not a traceback."""
    try:
        yield from loader
    except DataError as e:
        raise DataError(str(e).strip().splitlines()[-1].split("DataError: ")[-1]) from None
