"""Image files and ImageFolders on disk, read with errors that name the file: shared by training, export (calibration
and validation images), evaluation and offline prediction. PIL and the standard library only."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from modelship.errors import DataError

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError)  # what PIL raises for a non-image


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS and path.is_file()


def open_image(path: str) -> Image.Image:
    """Open and fully decode one image file, naming the file when it cannot be read."""
    try:
        image = Image.open(path)
        image.load()
    except UNREADABLE as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return image


def scan_folder(root: Path, what: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted sub-folder names) and (file, label) pairs of an ImageFolder, with errors a person can act on."""
    if not root.exists():
        raise DataError(f"{what} {root} does not exist; expected a folder with one sub-folder of images per class")
    if not root.is_dir():
        raise DataError(f"{what} {root} is a file; expected a folder with one sub-folder of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{what} {root} has no class sub-folders; expected {root}/<class>/<image files>")
    samples: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        files = sorted(str(p) for p in (root / name).rglob("*") if is_image_file(p))
        if not files:
            empty.append(name)
        samples.extend((f, label) for f in files)
    if not samples:
        raise DataError(f"{what} {root} has class folders but no images (looked for {', '.join(IMG_EXTENSIONS)})")
    if empty:
        raise DataError(f"{what} {root}: class folder(s) {', '.join(empty)} contain no images")
    return classes, samples


def folder_images(root: Path, what: str) -> list[str]:
    """Every image file under `root`, recursively (an ImageFolder or a plain folder of images), sorted."""
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a folder; expected a folder of images (an ImageFolder works too)")
    files = sorted(str(p) for p in root.rglob("*") if is_image_file(p))
    if not files:
        raise DataError(f"{what} {root} has no images (looked for {', '.join(IMG_EXTENSIONS)})")
    return files


def unreadable(paths: list[str]) -> list[str]:
    """The files among `paths` whose header PIL cannot read (cheap: nothing is decoded)."""
    bad = []
    for p in paths:
        try:
            with Image.open(p):
                pass
        except UNREADABLE:
            bad.append(p)
    return bad
