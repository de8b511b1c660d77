"""Real folders: macOS leftovers, hidden thumbnails, decomposed Unicode names, decompression bombs, many bad files at
once, photos of every size, and a truncated file met by offline prediction."""

from __future__ import annotations

import re
import struct
import unicodedata
import zlib
from pathlib import Path

import pytest
import torch

from modelship.imagefolder import MAX_PIXELS, folder_images, scan_folder
from tests.helpers import write_folder


def bomb_png(path: Path, width: int = 20_000, height: int = 10_000) -> None:
    """A tiny file whose header claims width x height pixels (200 Mpixel): what Pillow calls a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))

    ihdr = struct.pack("!IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_hidden_files_and_macos_leftovers_are_skipped_everywhere_a_folder_is_read(tmp_path: Path) -> None:
    write_folder(tmp_path, {"cat": 2, "dog": 2})
    write_folder(tmp_path / "cat" / ".thumbnails", {"x": 1})  # a viewer's thumbnails inside a class
    (tmp_path / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS resource fork, not a PNG
    write_folder(tmp_path / "__MACOSX", {"cat": 1})  # what unzipping a macOS archive leaves
    write_folder(tmp_path / ".git-annex", {"x": 1})
    classes, samples = scan_folder(tmp_path, "data folder")
    assert classes == ["cat", "dog"]
    assert sorted(Path(p).relative_to(tmp_path).as_posix() for p, _ in samples) == [
        "cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"
    ]  # fmt: skip
    assert len(folder_images(tmp_path, "--calibration-data")) == 4


def test_class_names_are_nfc_so_a_decomposed_folder_is_the_same_class(tmp_path: Path) -> None:
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    write_folder(tmp_path / "a", {nfd: 2, "tea": 2})  # written on macOS
    write_folder(tmp_path / "b", {nfc: 2}, seed=1)  # written on Linux
    (tmp_path / "b" / nfc).rename(tmp_path / "a" / nfc)
    classes, samples = scan_folder(tmp_path / "a", "data folder")
    assert classes == [nfc, "tea"] and sum(1 for _, label in samples if label == 0) == 4


def test_every_bad_file_is_reported_in_one_run_naming_each(tmp_path: Path, data_dir: Path, cli) -> None:
    data = tmp_path / "data"
    write_folder(data, {"a": 6, "b": 6}, size=(16, 16))
    for i in range(3):
        (data / "a" / f"bad{i}.png").write_bytes(b"not a png")
    bomb_png(data / "b" / "huge.png")
    r = cli("train", "--data", data, "--epochs", "1", "--out", tmp_path / "run", "--device", "cpu")
    assert r.code == 2 and "Traceback" not in r.err and "DecompressionBomb" not in r.err
    line = r.last_line
    assert line.startswith("modelship train: error: 4 of the 16 images cannot be used: "), line
    for i in range(3):
        assert f"cannot read image {data / 'a' / f'bad{i}.png'}" in line
    assert f"image {data / 'b' / 'huge.png'} " in line and f"the limit is {MAX_PIXELS}" in line
    assert not (tmp_path / "run").exists()


def test_a_decompression_bomb_is_one_line_naming_it_in_every_offline_reader(
    tmp_path: Path, tiny_bundle: Path, tiny_ckpt: Path, cli
) -> None:
    data = tmp_path / "data"
    write_folder(data / "circle", {"x": 2}, size=(32, 32))
    bomb_png(data / "circle" / "x" / "huge.png")
    flat = data / "circle" / "x"
    runs = {
        "evaluate": ("evaluate", tiny_bundle, "--data", data, "--out", tmp_path / "ev"),
        "predict": ("predict", "--bundle", tiny_bundle, flat),
        "calibration": ("export", tiny_ckpt, "--out", tmp_path / "b", "--variants", "int8", "--calibration-data", flat),
    }
    for name in runs:
        r = cli(*runs[name])
        assert r.code == 2, (name, r.err)
        assert f"image {flat / 'huge.png'} " in r.last_line and "Traceback" not in r.err, (name, r.last_line)
        assert "DecompressionBomb" not in r.err


def test_varied_image_sizes_train_at_a_stated_square_size(tmp_path: Path, cli) -> None:
    data = tmp_path / "data"
    for i, size in enumerate([(141, 83), (141, 83), (300, 200), (64, 48), (500, 375), (120, 90)]):
        write_folder(tmp_path / f"part{i}", {"a": 1, "b": 1}, size=size, seed=i)
        for cls in ("a", "b"):
            (data / "train" / cls).mkdir(parents=True, exist_ok=True)
            (tmp_path / f"part{i}" / cls / "0.png").rename(data / "train" / cls / f"{i}.png")
    r = cli("train", "--data", data, "--epochs", "1", "--out", tmp_path / "run", "--device", "cpu", "--val-split",
            "0.3", "--model-kwargs", '{"width": 8}')  # fmt: skip
    assert r.code == 0, r.err[-2000:]
    said = re.search(r"images vary in size \((\d) sizes in 8 sampled, the most common \d+x\d+ in \d\): training at "
                     r"(\d+)x\2, the median shorter side; --image-size H,W sets it", r.err)  # fmt: skip
    assert said is not None, r.err[:600]
    side = int(said.group(2))
    assert side % 8 == 0 and 48 <= side <= 224 and int(said.group(1)) >= 4
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["data"]["input_shape"] == [3, side, side]


def test_predict_finds_a_truncated_file_before_it_writes_a_row(tmp_path: Path, tiny_bundle: Path, cli) -> None:
    folder = tmp_path / "imgs"
    write_folder(folder, {"x": 3}, size=(32, 32))
    whole = (folder / "x" / "2.png").read_bytes()
    (folder / "x" / "2.png").write_bytes(whole[: len(whole) // 2])  # the header reads; the pixels stop halfway
    r = cli("predict", "--bundle", tiny_bundle, folder)
    assert r.code == 2 and r.out == "", r.out
    assert f"cannot read image {folder / 'x' / '2.png'}" in r.last_line


@pytest.mark.parametrize("mode", ["L", "P"])
def test_an_image_of_another_mode_is_converted_for_calibration_as_serving_does(tmp_path: Path, mode: str) -> None:
    from PIL import Image

    from modelship.preprocess import Preprocess, preprocess_image

    path = tmp_path / "g.png"
    Image.new("L", (8, 8), 128).convert(mode).save(path)
    x = preprocess_image(Image.open(path), Preprocess((8, 8), 3, (0.0,) * 3, (1.0,) * 3))
    assert x.shape == (3, 8, 8) and abs(float(x.mean()) - 128 / 255) < 1e-6


def test_evaluate_names_every_file_that_does_not_decode_in_one_error_writing_nothing(
    tmp_path: Path, tiny_bundle: Path, cli
) -> None:
    data = tmp_path / "data"
    write_folder(data, {"circle": 3, "ring": 3}, size=(32, 32))
    for cls in ("circle", "ring"):
        whole = (data / cls / "1.png").read_bytes()
        (data / cls / "1.png").write_bytes(whole[: len(whole) // 2])  # headers read; the pixels stop halfway
    r = cli("evaluate", tiny_bundle, "--data", data, "--out", tmp_path / "ev")
    assert r.code == 2 and "Traceback" not in r.err
    assert r.last_line.startswith(f"modelship evaluate: error: 2 of the 6 images in --data {data} cannot be used: ")
    assert f"cannot read image {data / 'circle' / '1.png'}" in r.last_line
    assert f"cannot read image {data / 'ring' / '1.png'}" in r.last_line
    assert not (tmp_path / "ev").exists()


def truncate(path: Path) -> None:
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # the header reads; the pixels stop halfway


@pytest.mark.parametrize("cache", ["auto", "off"])
def test_a_truncated_file_and_one_that_is_not_an_image_are_named_in_one_run(
    tmp_path: Path, tiny_bundle: Path, cli, cache: str
) -> None:
    """The header pass finds the file that is not an image; the truncated one (its header reads) is named in the same
    error, in the first run, in both splits: train decodes every file then, and so does evaluate."""
    data = tmp_path / "data"
    for split in ("train", "val"):
        write_folder(data / split, {"circle": 4, "ring": 4}, size=(32, 32))
        truncate(data / split / "circle" / "1.png")
        (data / split / "ring" / "notes.png").write_text("not an image")
    bad = [data / s / f for s in ("train", "val") for f in ("circle/1.png", "ring/notes.png")]
    run = ["--epochs", "1", "--out", tmp_path / "run", "--device", "cpu", "--cache-dir", tmp_path / "cache"]
    r = cli("train", "--data", data, "--data-cache", cache, *run)
    assert r.code == 2 and "Traceback" not in r.err and not (tmp_path / "run").exists()
    assert r.last_line.startswith("modelship train: error: 4 of the 18 images cannot be used: "), r.last_line
    assert all(f"cannot read image {p}" in r.last_line for p in bad), r.last_line
    assert "image file is truncated" in r.last_line

    r = cli("evaluate", tiny_bundle, "--data", data, "--out", tmp_path / "ev")
    assert r.code == 2 and "Traceback" not in r.err and not (tmp_path / "ev").exists()
    assert r.last_line.startswith(f"modelship evaluate: error: 2 of the 9 images in --data {data / 'val'} cannot be")
    assert all(f"cannot read image {p}" in r.last_line for p in bad[2:]), r.last_line
