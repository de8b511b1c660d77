"""Datasets: `shapes`, a user's ImageFolder, or a torchvision dataset, all ending as (tensor, label) datasets.

The eval transform is `modelship.preprocess.preprocess_image`, described fully by the checkpoint's `data` block, so
export and serving reproduce it without torchvision. Train-time augmentation sits in front of the same normalisation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from modelship.errors import DataError
from modelship.imagefolder import (
    GRAY_MODES,
    BadFiles,
    check_readable,
    folder_splits,
    layout_split,
    open_image,
    raise_bad,
)
from modelship.preprocess import Preprocess, normalize, preprocess_image, to_array
from modelship.training import cache
from modelship.training.inspect import INSPECT_VERSION, inspect_images
from modelship.training.inspect import sample as sampled

log = logging.getLogger(__name__)

TORCHVISION_DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}
BUILTIN = ("shapes", *TORCHVISION_DATASETS)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_data_dir() -> Path:
    """Where built-in and downloaded datasets live unless --data-dir says otherwise."""
    return Path(os.environ.get("MODELSHIP_DATA", Path.home() / ".cache" / "modelship" / "data"))


@dataclass
class DataInfo:
    """What the checkpoint records about the data: enough to preprocess a raw image exactly as validation did."""

    classes: list[str]
    input_shape: list[int]  # [C, H, W]
    mean: list[float]
    std: list[float]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict({"input_shape": self.input_shape, "mean": self.mean, "std": self.std})

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "input_shape": list(self.input_shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "source": dict(self.source),
        }


class LabelledDataset(Dataset):
    """A dataset of (tensor, label) with its labels listed up front (the balanced sampler needs them)."""

    targets: list[int]

    def __len__(self) -> int:
        raise NotImplementedError


class ImageList(LabelledDataset):
    """(path, label) pairs read through a transform; the ImageFolder path every folder dataset goes through."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable[[Image.Image], torch.Tensor]):
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(open_image(path)), label


class Transformed(LabelledDataset):
    """A torchvision dataset (PIL image, label) seen through our transform."""

    def __init__(self, base: Any, transform: Callable[[Image.Image], torch.Tensor]):
        self.base = base
        self.targets = [int(t) for t in base.targets]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), int(label)


class EvalTransform:
    """The eval transform as a picklable callable (DataLoader workers need that)."""

    def __init__(self, pre: Preprocess):
        self.pre = pre

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess_image(image, self.pre))


class TrainTransform:
    """Random crop with reflect padding and horizontal flip, then the eval normalisation."""

    def __init__(self, pre: Preprocess, augment: bool):
        self.pre = pre
        self.augment = augment

    def __call__(self, image: Image.Image) -> torch.Tensor:
        arr = to_array(image, self.pre)
        if self.augment:
            h, w = self.pre.size
            pad = max(1, min(h, w) // 8)
            padded = np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
            top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
            arr = padded[top : top + h, left : left + w]
            if torch.rand(()) < 0.5:
                arr = arr[:, ::-1]
        return torch.from_numpy(normalize(arr, self.pre))


def channel_stats(arrays: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of uint8 images [N, H, W, C] (resized and converted as for training), from
    each channel's histogram of its 256 levels, counted a few images at a time: exact, and no float copy of the
    images (2,000 at 224x224 were 2.4 GB of float64 and a second such temporary for the std)."""
    n, channels = len(arrays), arrays.shape[-1]
    counts = np.zeros(256 * channels, dtype=np.int64)
    offsets = np.arange(channels) * 256  # channel c counts levels at c * 256 + level
    step = max(1, STATS_CHUNK // max(1, arrays[0].size)) if n else 1
    for start in range(0, n, step):
        counts += np.bincount((arrays[start : start + step].reshape(-1, channels) + offsets).ravel(),
                              minlength=256 * channels)  # fmt: skip
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for hist in counts.reshape(channels, 256).astype(np.float64):
        mean = float(hist @ levels / hist.sum())
        std = float(np.sqrt(hist @ (levels - mean) ** 2 / hist.sum()))
        means.append(round(mean, 6))
        stds.append(round(max(std, 1e-3), 6))
    return means, stds


STATS_CHUNK = 1 << 19  # pixel values counted at once: an int64 temporary of 4 MiB


# ---------------------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class DataRequest:
    """The data part of TrainConfig: what `load_data` needs."""

    name: str
    data_dir: Path
    val_split: float = 0.2
    seed: int = 0
    shapes_train: int = 2000
    shapes_val: int = 500
    image_size: tuple[int, int] | None = None
    augment: bool | None = None
    download: bool = False
    imagenet_stats: bool = False
    data_cache: str = "off"  # auto | ram | gpu | off: see modelship.training.cache
    cache_dir: Path | None = None
    device: str = "cpu"


@dataclass
class Loaded:
    """The two splits (PIL datasets), what the checkpoint records about them, and, when --data-cache decodes them,
    their uint8 arrays [N, H, W, C] and where they go ('ram' or 'gpu')."""

    train: LabelledDataset
    val: LabelledDataset
    info: DataInfo
    augment: bool
    arrays: tuple[np.ndarray, np.ndarray] | None = None
    place: str | None = None
    note: str = "data read per sample with PIL"


def load_data(req: DataRequest) -> Loaded:
    """The splits of a dataset name or folder path, decoded once when --data-cache says so."""
    if req.name in TORCHVISION_DATASETS:
        return _load_torchvision(req)
    if req.name == "shapes":
        from modelship.training.shapes import ensure_shapes

        root = ensure_shapes(req.data_dir, seed=req.seed, train=req.shapes_train, val=req.shapes_val)
        source: dict[str, Any] = {"name": "shapes", "seed": req.seed, "train": req.shapes_train, "val": req.shapes_val}
    else:
        root = Path(req.name).expanduser()
        if not root.exists() and os.sep not in req.name and "." not in req.name:
            raise DataError(f"unknown dataset {req.name!r}; expected one of {', '.join(BUILTIN)} or a folder path")
        source = {"name": "imagefolder"}
    classes, train, val, layout = folder_splits(root.resolve(), req.val_split, req.seed)
    source.update(layout)
    if len(classes) < 2:
        raise DataError(f"{root} has a single class ({classes[0]}); a classifier needs at least 2 class folders")
    channels, size, why_size = _inspect([p for p, _ in train], [p for p, _ in val], req)
    probe = _probe(channels, req.image_size or size)
    place, why = _place(req, len(train) + len(val), probe)
    arrays: tuple[np.ndarray, np.ndarray] | None = None
    if place is not None:
        (a, how_a), (b, how_b) = _decode_splits([p for p, _ in train], [p for p, _ in val], probe, req.cache_dir)
        arrays, why = (a, b), f"{how_a} / {how_b}" if how_a != how_b else how_a
        sample = a[sampled(range(len(a)), req.seed)]
    else:  # read per sample each epoch: every file decoded once now, so a truncated one fails here, not in epoch 3
        check_readable([p for p, _ in [*train, *val]], "images", decode=True)
        sample = cache.decode_images((open_image(p) for p, _ in sampled(train, req.seed)), probe)
    info, augment = _describe(classes, probe, sample, source, req)
    pre = info.preprocess
    sets = ImageList(train, TrainTransform(pre, augment)), ImageList(val, EvalTransform(pre))
    note = _note(place, arrays, why) + (f"; {why_size}" if why_size and req.image_size is None else "")
    return Loaded(*sets, info, augment, arrays, place, note)


def _decode_splits(
    train: list[str], val: list[str], probe: Preprocess, cache_dir: Path | None
) -> list[tuple[np.ndarray, str]]:
    """Both splits decoded (or from the cache); the files of either that do not decode, all in one error."""
    done, bad = [], []
    for files in (train, val):
        try:
            done.append(cache.decode_files(files, probe, cache_dir))
        except BadFiles as e:
            bad += e.problems
    raise_bad(bad, len(train) + len(val), "images")
    return done


def _inspect(train: list[str], val: list[str], req: DataRequest) -> tuple[int, tuple[int, int], str]:
    """inspect_images, or its answer for the same files (names, sizes, mtimes, inodes: no file is read to know) from
    the decoded cache's records: opening every header again was most of a warm start's data work."""
    if req.data_cache == "off" or req.cache_dir is None:
        return inspect_images(train, val, req.seed)
    parts = [INSPECT_VERSION, cache.stats_key(train), cache.stats_key(val), req.seed]
    channels, (h, w), why = cache.remembered(
        req.cache_dir, "inspect", parts, lambda: inspect_images(train, val, req.seed)
    )
    return channels, (h, w), why


def _probe(channels: int, size: tuple[int, int]) -> Preprocess:
    """The resize and conversion of the eval preprocessing, before mean and std are known."""
    return Preprocess(size=size, channels=channels, mean=(0.0,) * channels, std=(1.0,) * channels)


def _place(req: DataRequest, n: int, probe: Preprocess) -> tuple[str | None, str]:
    nbytes = n * probe.channels * probe.size[0] * probe.size[1]
    place = cache.choose_place(req.data_cache, nbytes, req.device)
    if place is None and req.data_cache == "auto":
        return None, f"{nbytes / 2**20:.0f} MiB decoded is over the memory budget"
    return place, "--data-cache off"


def _note(place: str | None, arrays: tuple[np.ndarray, np.ndarray] | None, why: str) -> str:
    """How the data is read, for the run's first line."""
    if place is None or arrays is None:
        return f"data read per sample with PIL ({why})"
    mib = sum(a.nbytes for a in arrays) / 2**20
    return f"data decoded {'on the GPU' if place == 'gpu' else 'in RAM'} ({mib:.1f} MiB, {why})"


def _describe(
    classes: list[str], probe: Preprocess, sample: np.ndarray, source: dict, req: DataRequest
) -> tuple[DataInfo, bool]:
    channels, size = probe.channels, probe.size
    if req.imagenet_stats:
        if channels != 3:
            raise DataError("--pretrained weights expect RGB input; this dataset is grayscale")
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    else:
        mean, std = channel_stats(sample)
    info = DataInfo(classes=classes, input_shape=[channels, size[0], size[1]], mean=mean, std=std, source=source)
    augment = req.augment if req.augment is not None else channels == 3
    return info, augment


def _load_torchvision(req: DataRequest) -> Loaded:
    import torchvision.datasets as tvd

    cls = getattr(tvd, TORCHVISION_DATASETS[req.name])
    root = req.data_dir
    try:
        train_base = cls(str(root), train=True, download=req.download)
        val_base = cls(str(root), train=False, download=req.download)
    except RuntimeError as e:
        if req.download:
            raise DataError(f"could not download {req.name} into {root}: {e}") from None
        raise DataError(
            f"{req.name} is not in {root / cls.__name__} (or its files are incomplete); rerun with --download where "
            f"the network allows, or copy the dataset files there (--data-dir sets the folder)"
        ) from None
    except OSError as e:  # URLError and friends when --download has no network
        raise DataError(
            f"could not download {req.name} into {root} ({e}); offline? copy the files there instead"
        ) from None
    classes = [str(c) for c in train_base.classes]
    first = train_base[0][0]
    probe = _probe(1 if first.mode in GRAY_MODES else 3, req.image_size or (first.height, first.width))
    place, why = _place(req, len(train_base) + len(val_base), probe)
    arrays: tuple[np.ndarray, np.ndarray] | None = None
    if place is not None:  # decoded in memory each run: the datasets' own files are already compact arrays
        a, b = (cache.decode_images((base[i][0] for i in range(len(base))), probe) for base in (train_base, val_base))
        arrays, why = (a, b), "decoded"
        sample = a[sampled(range(len(a)), req.seed)]
    else:
        sample = cache.decode_images((train_base[i][0] for i in sampled(range(len(train_base)), req.seed)), probe)
    info, augment = _describe(classes, probe, sample, {"name": req.name, "root": str(root)}, req)
    pre = info.preprocess
    sets = Transformed(train_base, TrainTransform(pre, augment)), Transformed(val_base, EvalTransform(pre))
    return Loaded(*sets, info, augment, arrays, place, _note(place, arrays, why))


def source_samples(data: dict[str, Any], split: str, limit: int, seed: int = 0) -> list[tuple[Image.Image, int]]:
    """Up to `limit` (image, label) pairs of the `train` or `val` split a checkpoint's data block describes: evenly
    spread over the validation split, a seeded sample of the training split. [] when the data is not on disk."""
    source = data.get("source") or {}
    try:
        if source.get("name") in TORCHVISION_DATASETS:
            import torchvision.datasets as tvd

            cls = getattr(tvd, TORCHVISION_DATASETS[source["name"]])
            base = cls(source["root"], train=split == "train", download=False)
            return [(base[i][0], int(base[i][1])) for i in _pick(range(len(base)), split, limit, seed)]
        if "root" not in source:
            return []
        files = layout_split(source, split)
    except (DataError, RuntimeError, OSError, KeyError, ValueError) as e:
        log.info("the %s images of %s are not available (%s)", split, source.get("name", "the checkpoint"), e)
        return []
    # the folder is there: a file in it that cannot be read is named, never taken for "no data"
    return [(open_image(p), label) for p, label in _pick(files, split, limit, seed)]


def _pick(items: Sequence[Any], split: str, limit: int, seed: int) -> list[Any]:
    if split == "val":  # evenly spaced: spread over the classes rather than the first class only
        return list(items[:: max(1, len(items) // limit)][:limit])
    idx = np.random.default_rng(seed).permutation(len(items))[:limit]
    return [items[i] for i in sorted(idx)]


def validation_images(data: dict[str, Any], limit: int) -> list[Image.Image]:
    """Up to `limit` validation images of a checkpoint's data block, if its source is still on disk; else []."""
    return [image for image, _ in source_samples(data, "val", limit)]
