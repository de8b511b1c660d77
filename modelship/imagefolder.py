"""Image files and ImageFolders on disk, read with errors that name the file: shared by training, export (calibration
and validation images), evaluation and offline prediction. PIL, numpy and the standard library only.

Every folder is read by the same rules: hidden files and folders (`.thumbnails/`, macOS's `._name.jpg` AppleDouble
files) and `__MACOSX/` are skipped; class names are Unicode NFC (macOS writes file names decomposed, so the same
name typed on two machines would otherwise be two classes); an image over `MAX_PIXELS` is refused by name before it
is decoded; and every unreadable file is reported at once, not one per run.
"""

from __future__ import annotations

import unicodedata
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from modelship.errors import DataError

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError)  # what PIL raises for a non-image
MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS), for files on disk
LEFTOVERS = frozenset({"__MACOSX"})  # folders archive tools leave beside the data
SHOWN = 10  # bad files listed by name before "and N more"
T = TypeVar("T")
Samples = list[tuple[str, int]]  # (path, class index)


def class_name(name: str) -> str:
    """A class name as it is compared and written: Unicode NFC."""
    return unicodedata.normalize("NFC", name)


def visible(path: Path, root: Path) -> bool:
    """Not hidden and not an archive leftover, at any level under `root`."""
    return not any(part.startswith(".") or part in LEFTOVERS for part in path.relative_to(root).parts)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS and path.is_file()


def images_under(root: Path) -> list[str]:
    """The visible image files under `root`, recursively, sorted."""
    return sorted(str(p) for p in root.rglob("*") if is_image_file(p) and visible(p, root))


def open_header(path: str) -> Image.Image:
    """Open an image file without decoding its pixels, refusing one over MAX_PIXELS by name (and never letting
    Pillow's own DecompressionBombWarning or its error through)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError:
        raise DataError(f"image {path} has more than {MAX_PIXELS} pixels; the limit is {MAX_PIXELS}") from None
    except UNREADABLE as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    if image.width * image.height > MAX_PIXELS:
        image.close()
        raise DataError(f"image {path} is {image.width}x{image.height} pixels; the limit is {MAX_PIXELS} pixels")
    return image


def open_image(path: str) -> Image.Image:
    """Open and fully decode one image file, naming the file when it cannot be read."""
    image = open_header(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except UNREADABLE as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return image


def scan_folder(root: Path, what: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted, NFC sub-folder names) and (file, label) pairs of an ImageFolder, with errors a person can
    act on. Two folders whose names differ only in Unicode normalisation are one class."""
    if not root.exists():
        raise DataError(f"{what} {root} does not exist; expected a folder with one sub-folder of images per class")
    if not root.is_dir():
        raise DataError(f"{what} {root} is a file; expected a folder with one sub-folder of images per class")
    folders: dict[str, list[Path]] = {}
    for p in sorted(root.iterdir()):
        if p.is_dir() and visible(p, root):
            folders.setdefault(class_name(p.name), []).append(p)
    classes = sorted(folders)
    if not classes:
        raise DataError(f"{what} {root} has no class sub-folders; expected {root}/<class>/<image files>")
    samples: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        files = sorted(f for d in folders[name] for f in images_under(d))
        if not files:
            empty.append(name)
        samples.extend((f, label) for f in files)
    if not samples:
        raise DataError(f"{what} {root} has class folders but no images (looked for {', '.join(IMG_EXTENSIONS)})")
    if empty:
        raise DataError(f"{what} {root}: class folder(s) {', '.join(empty)} contain no images")
    return classes, samples


def eval_split(data: Path) -> Path:
    """Where a labelled folder's evaluation images are: PATH/val, else PATH/test, else PATH itself."""
    return next((data / s for s in ("val", "test") if (data / s).is_dir()), data)


def folder_images(root: Path, what: str) -> list[str]:
    """Every visible image file under `root`, recursively (an ImageFolder or a plain folder of images), sorted."""
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a folder; expected a folder of images (an ImageFolder works too)")
    files = images_under(root)
    if not files:
        raise DataError(f"{what} {root} has no images (looked for {', '.join(IMG_EXTENSIONS)})")
    return files


def check_readable(paths: list[str], what: str, decode: bool = False) -> None:
    """DataError listing every file among `paths` that is not an image PIL can read (headers only, or fully decoded
    with `decode`) or is over the pixel limit: all of them at once, up to SHOWN by name. When a header fails, every
    file is decoded too, so a truncated file is named in the same error as one that is not an image at all."""
    if decode or problems(paths, open_header):
        raise_bad(undecodable(paths), len(paths), what)


def undecodable(paths: Sequence[str]) -> list[str]:
    """Why each file among `paths` does not decode to the end (a header pass found a bad file, or the caller wants
    every one decoded): one line per bad file, in order."""
    return problems(paths, open_image)


def problems(paths: Sequence[str], opener: Callable[[str], Image.Image]) -> list[str]:
    """Why each file among `paths` fails `opener` (open_header: the header; open_image: decoded to the end)."""
    bad = []
    for p in paths:
        try:
            opener(p).close()
        except DataError as e:
            bad.append(str(e))
    return bad


def decode_each(paths: list[str], what: str, convert: Callable[[Image.Image], T]) -> Iterator[T]:
    """`convert` of each file fully decoded, in order; a file that does not decode is skipped, and once all were
    tried every one is named in one DataError (raise_bad), so a caller never uses a result of a folder with a bad
    file."""
    bad = []
    for p in paths:
        try:
            image = open_image(p)
        except DataError as e:
            bad.append(str(e))
            continue
        yield convert(image)
    raise_bad(bad, len(paths), what)


class BadFiles(DataError):
    """Some files of a scan cannot be used: every one of them (`problems`, a line each) among `total`."""

    def __init__(self, problems: list[str], total: int, what: str):
        more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        super().__init__(f"{len(problems)} of the {total} {what} cannot be used: {'; '.join(problems[:SHOWN])}{more}")
        self.problems, self.total = problems, total


def raise_bad(problems: list[str], total: int, what: str) -> None:
    """One DataError for every problem found in a scan (the first SHOWN of them by name), or nothing."""
    if problems:
        raise BadFiles(problems, total, what)


def split_samples(samples: Samples, fraction: float, seed: int) -> tuple[Samples, Samples]:
    """Stratified split, a function of (files, fraction, seed) only."""
    by_class: dict[int, list[tuple[str, int]]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    rng = np.random.default_rng(seed)
    train: Samples = []
    val: Samples = []
    for label in sorted(by_class):
        items = by_class[label]
        order = rng.permutation(len(items))
        n_val = min(len(items) - 1, max(1, round(len(items) * fraction))) if len(items) > 1 else 0
        val.extend(items[i] for i in sorted(order[:n_val]))
        train.extend(items[i] for i in sorted(order[n_val:]))
    if not val:
        raise DataError("--val-split left no validation images; every class needs at least 2 images")
    return train, val


def folder_splits(root: Path, val_split: float, seed: int) -> tuple[list[str], Samples, Samples, dict[str, Any]]:
    """Training and validation samples of a folder: PATH/train + PATH/val, or PATH/train (or PATH itself) split by
    --val-split; with the layout that says which (a checkpoint's data source records it: `layout_split`)."""
    if root.is_dir() and (root / "train").is_dir():
        classes, train = scan_folder(root / "train", "training folder")
        if (root / "val").is_dir():
            val_classes, val = scan_folder(root / "val", "validation folder")
            if val_classes != classes:
                raise DataError(
                    f"{root}/val has classes {val_classes} but {root}/train has {classes}; they must be the same"
                )
            return classes, train, val, {"root": str(root), "train_dir": "train", "val_dir": "val"}
        train, val = split_samples(train, val_split, seed)
        return classes, train, val, {"root": str(root), "train_dir": "train", "val_split": val_split, "seed": seed}
    classes, samples = scan_folder(root, "data folder")
    train, val = split_samples(samples, val_split, seed)
    return classes, train, val, {"root": str(root), "train_dir": "", "val_split": val_split, "seed": seed}


def layout_split(layout: dict[str, Any], split: str) -> Samples:
    """The `train` or `val` samples of the folder a `folder_splits` layout describes (a checkpoint's data source):
    the same files by the same rule, for export's calibration and validation images and the run's report."""
    root = Path(layout["root"])
    if "val_dir" in layout:
        return scan_folder(root / (layout["val_dir"] if split == "val" else layout["train_dir"]), f"{split} folder")[1]
    _, samples = scan_folder(root / layout.get("train_dir", ""), "data folder")
    train, val = split_samples(samples, float(layout["val_split"]), int(layout["seed"]))
    return val if split == "val" else train
