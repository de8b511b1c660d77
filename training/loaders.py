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


Loader = Any  # a DataLoader, or DeviceBatches over decoded data: both iterate (x, y) batches


def make_loaders(
    cfg: TrainConfig,
    sets: tuple[LabelledDataset, LabelledDataset],
    decoded: Any,
    pre: Any,
    augment: bool,
    dist: Dist,
    device: torch.device,
) -> tuple[Loader, Loader, EpochSampler]:
    """The training loader (its sampler is set per epoch) and the validation loader, this rank's shard of each:
    batches of decoded data on its device when there is some, the PIL DataLoader otherwise."""
    train_ds, val_ds = sets
    weights = class_weights(train_ds.targets) if cfg.balanced_sampler else None
    train_sampler = EpochSampler(
        len(train_ds), seed=cfg.seed, shuffle=True, weights=weights, rank=dist.rank, world_size=dist.world_size
    )
    val_sampler = EpochSampler(
        len(val_ds), seed=cfg.seed, shuffle=False, rank=dist.rank, world_size=dist.world_size, pad=False
    )
    if decoded is not None:
        train = DeviceBatches(decoded[0], train_sampler, cfg.batch_size, augment, pre, device)
        return train, DeviceBatches(decoded[1], val_sampler, cfg.batch_size * 2, False, pre, device), train_sampler
    workers = cfg.workers
    if workers is None:
        workers = min(8, (os.cpu_count() or 1) // dist.world_size) if device.type == "cuda" else 0
    common: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": False}
    # The generator seeds worker RNGs (augmentation); it is reseeded from (seed, epoch) before every epoch.
    train_loader = DataLoader(
        train_ds, batch_size=cfg.batch_size, sampler=train_sampler, generator=torch.Generator(), **common
    )
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size * 2, sampler=val_sampler, **common)
    return train_loader, val_loader, train_sampler


def start_epoch(loader: Loader, sampler: EpochSampler, seed: int, epoch: int) -> None:
    """Data order and augmentation RNG for `epoch`: a function of (seed, epoch) only, so resume is exact."""
    sampler.set_epoch(epoch)
    generator = loader.generator
    assert generator is not None
    generator.manual_seed(seed * 7919 + epoch)


def batches(loader: DataLoader) -> Iterator[Any]:
    """Iterate a loader; a DataError raised in a worker comes back as the one line it said, not a traceback."""
    try:
        yield from loader
    except DataError as e:
        raise DataError(str(e).strip().splitlines()[-1].split("DataError: ")[-1]) from None


class DeviceBatches:
    """Batches from decoded data on its device: gathered by index, augmented as a whole batch (random crop with
    reflect padding and horizontal flip, as the PIL path does per image), normalised there.

    Order and augmentation are functions of (seed, epoch): the sampler shuffles as the DataLoader path does, and the
    augmentation generator is reseeded every epoch, so a resumed run sees the same batches.
    """

    def __init__(self, data: Any, sampler: EpochSampler, batch_size: int, augment: bool, pre: Any,
                 device: torch.device) -> None:  # fmt: skip
        self.images, self.labels = data.images, data.labels
        self.sampler, self.batch_size, self.augment, self.device = sampler, batch_size, augment, device
        self.mean = torch.tensor(pre.mean, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(pre.std, device=device).view(1, -1, 1, 1) * 255.0
        self.generator = torch.Generator(device=device)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.int64, device=self.images.device)
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            x = self.images[idx].to(self.device, non_blocking=True).float()
            y = self.labels[idx].to(self.device, non_blocking=True)
            if self.augment:
                x = crop_and_flip(x, self.generator)
            yield (x - self.mean) / self.std, y


def crop_and_flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per image: a random HxW window of the image reflect-padded by min(H, W) // 8, then a flip with p = 0.5."""
    n, c, h, w = x.shape
    pad = max(1, min(h, w) // 8)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g, device=x.device)
    rows = (offsets[:, :1] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[:, 1:] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, chans, rows, cols]
    flip = torch.rand(n, generator=g, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)
