"""Datasets: shapes, ImageFolders (split or not, gray or RGB), torchvision files, and how they go wrong."""

from __future__ import annotations

import hashlib
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modelship.errors import DataError
from modelship.preprocess import Preprocess, preprocess_image
from modelship.training.data import DataRequest, Loaded, channel_stats, load_data, validation_images
from modelship.training.shapes import CLASSES, ensure_shapes
from tests.helpers import write_folder


def splits(loaded: Loaded) -> tuple:
    """(train, val, info, augment) of what load_data returns."""
    return loaded.train, loaded.val, loaded.info, loaded.augment


def req(name: str | Path, data_dir: Path, **kw) -> DataRequest:
    return DataRequest(name=str(name), data_dir=data_dir, **kw)


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.png")):
        h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_shapes_is_an_imagefolder_of_pngs_deterministic_from_the_seed(tmp_path: Path) -> None:
    a = ensure_shapes(tmp_path / "a", seed=3, train=20, val=10)
    b = ensure_shapes(tmp_path / "b", seed=3, train=20, val=10)
    c = ensure_shapes(tmp_path / "c", seed=4, train=20, val=10)
    assert sorted(p.name for p in (a / "train").iterdir()) == sorted(CLASSES)
    assert len(list((a / "train").rglob("*.png"))) == 20 and len(list((a / "val").rglob("*.png"))) == 10
    with Image.open(next((a / "val" / "circle").iterdir())) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (32, 32))
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_shapes_counts_are_configurable_and_read_through_the_folder_path(data_dir: Path) -> None:
    train, val, info, augment = splits(load_data(req("shapes", data_dir, shapes_train=50, shapes_val=15)))
    assert (len(train), len(val)) == (50, 15)
    assert info.classes == list(CLASSES) and info.input_shape == [3, 32, 32]
    assert info.source["name"] == "shapes" and Path(info.source["root"]).is_dir()
    assert augment is True
    x, y = val[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 32, 32) and 0 <= y < 5


def test_train_and_val_folders_record_channels_size_classes_and_stats(tmp_path: Path) -> None:
    write_folder(tmp_path / "d" / "train", {"cat": 6, "dog": 4}, mode="L", size=(12, 10))
    write_folder(tmp_path / "d" / "val", {"cat": 2, "dog": 2}, mode="L", size=(12, 10), seed=1)
    train, val, info, augment = splits(load_data(req(tmp_path / "d", tmp_path)))
    assert (len(train), len(val)) == (10, 4)
    assert info.classes == ["cat", "dog"]
    assert info.input_shape == [1, 10, 12]  # C, H, W
    assert len(info.mean) == len(info.std) == 1
    assert 0.4 < info.mean[0] < 0.6 and 0.2 < info.std[0] < 0.4  # uniform random pixels
    assert augment is False  # grayscale: no flips by default
    assert tuple(train[0][0].shape) == (1, 10, 12)


def test_channel_stats_are_the_pixels_exact_mean_and_std() -> None:
    rng = np.random.default_rng(0)
    images = np.concatenate([rng.integers(0, 256, (40, 9, 7, 1)), rng.integers(90, 110, (40, 9, 7, 1)),
                             np.full((40, 9, 7, 1), 200)], axis=-1).astype(np.uint8)  # fmt: skip
    mean, std = channel_stats(images)
    pixels = images.reshape(-1, 3).astype(np.float64) / 255.0
    assert mean == pytest.approx(list(pixels.mean(0)), abs=1e-6)
    assert std[:2] == pytest.approx(list(pixels.std(0))[:2], abs=1e-6)
    assert mean[2] == round(200 / 255, 6) and std[2] == 1e-3  # a constant channel: no division by zero later
    big = rng.integers(0, 256, (800, 64, 64, 3), dtype=np.uint8)
    tracemalloc.start()
    channel_stats(big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < big.nbytes / 2  # a float64 copy would be 8x the images (2,000 at 224x224: 2.4 GB)
    reference = big.reshape(-1, 3).astype(np.float64) / 255.0  # counted in many chunks, the same numbers
    assert channel_stats(big) == (pytest.approx(list(reference.mean(0)), abs=1e-6),
                                  pytest.approx(list(reference.std(0)), abs=1e-6))  # fmt: skip


def test_one_folder_is_split_stratified_and_deterministically(tmp_path: Path) -> None:
    write_folder(tmp_path / "d", {"a": 10, "b": 5, "c": 3})
    _, val1, info, _ = splits(load_data(req(tmp_path / "d", tmp_path, val_split=0.2, seed=1)))
    _, val2, _, _ = splits(load_data(req(tmp_path / "d", tmp_path, val_split=0.2, seed=1)))
    _, val3, _, _ = splits(load_data(req(tmp_path / "d", tmp_path, val_split=0.2, seed=2)))
    assert info.input_shape == [3, 10, 12]
    assert [y for _, y in val1.samples] == [0, 0, 1, 2]  # every class present in validation
    assert val1.samples == val2.samples
    assert val1.samples != val3.samples
    assert info.source["val_split"] == 0.2
    assert len(validation_images(info.to_dict(), 10)) == 4  # export finds the same validation images again


def test_mixed_sizes_and_modes_are_converted_and_resized(tmp_path: Path) -> None:
    write_folder(tmp_path / "d", {"a": 3}, mode="RGB", size=(16, 16))
    write_folder(tmp_path / "d", {"b": 3}, mode="L", size=(20, 8))
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(tmp_path / "d" / "b" / "alpha.png")
    train, _, info, _ = splits(load_data(req(tmp_path / "d", tmp_path, image_size=(9, 7))))
    assert info.input_shape == [3, 9, 7]
    assert all(tuple(train[i][0].shape) == (3, 9, 7) for i in range(len(train)))


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "has no class sub-folders"),
        (lambda d: (d / "only").mkdir(parents=True), "has class folders but no images"),
        (lambda d: write_folder(d, {"only": 4}), "has a single class (only)"),
        (lambda d: (write_folder(d, {"a": 3}), (d / "b").mkdir()), "class folder(s) b contain no images"),
    ],
    ids=["missing", "empty", "no-images", "one-class", "empty-class"],
)
def test_bad_folders_say_what_is_wrong(tmp_path: Path, setup, expected: str) -> None:
    setup(tmp_path / "d")
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_data(req(tmp_path / "d", tmp_path))


def test_an_unreadable_image_is_named(tmp_path: Path) -> None:
    write_folder(tmp_path / "d", {"a": 3, "b": 3})
    (tmp_path / "d" / "b" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"cannot read image .*b/broken\.png"):
        load_data(req(tmp_path / "d", tmp_path))


def test_a_truncated_image_is_named_when_read(tmp_path: Path) -> None:
    write_folder(tmp_path / "d", {"a": 3, "b": 3}, size=(64, 64))
    good = (tmp_path / "d" / "a" / "0.png").read_bytes()
    (tmp_path / "d" / "a" / "0.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cannot read image .*a/0\.png"):
        load_data(req(tmp_path / "d", tmp_path))  # the stats pass decodes it fully


def test_unknown_dataset_name_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match="unknown dataset 'imagenet'; expected one of shapes, mnist, fashion-mnist, cifar10"
    ):
        load_data(req("imagenet", tmp_path))


def _write_idx(path: Path, arr: np.ndarray) -> None:
    # the MNIST idx format: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian dims, then the bytes
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_torchvision_datasets_read_local_files(tmp_path: Path, name: str, folder: str) -> None:
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 12)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    train, val, info, augment = splits(load_data(req(name, tmp_path)))
    assert (len(train), len(val)) == (40, 12)
    assert info.input_shape == [1, 28, 28] and len(info.classes) == 10
    assert augment is False
    assert tuple(val[3][0].shape) == (1, 28, 28) and val[3][1] == 3
    assert len(validation_images(info.to_dict(), 5)) == 5


def test_missing_torchvision_dataset_says_where_the_files_go(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_data(req("cifar10", tmp_path))
    msg = str(e.value)
    assert f"cifar10 is not in {tmp_path / 'CIFAR10'}" in msg and "--download" in msg
    assert "\n" not in msg


def test_eval_transform_is_the_shared_preprocess_function(data_dir: Path) -> None:
    _, val, info, _ = splits(load_data(req("shapes", data_dir, shapes_train=50, shapes_val=15)))
    path, _ = val.samples[4]
    with Image.open(path) as im:
        expected = preprocess_image(im, Preprocess.from_dict(info.to_dict()))
    assert np.array_equal(val[4][0].numpy(), expected)
