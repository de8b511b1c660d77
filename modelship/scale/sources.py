"""The files a run scores: (path as shown in the rows, where to read it), listed by the driver."""

from __future__ import annotations

import os
import re
from pathlib import Path

from modelship.errors import DataError
from modelship.imagefolder import IMG_EXTENSIONS, images_under, visible

URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def sources(paths: tuple[str, ...]) -> list[tuple[str, str]]:
    """(path as shown in the rows, where to read it) for every file of every source; DataError naming a source that
    does not exist or holds no images."""
    found: list[tuple[str, str]] = []
    for p in paths:
        if URI.match(p):
            found += uri_files(p)
        elif Path(p).is_dir():
            files = images_under(Path(p))
            if not files:
                raise DataError(f"folder {p} has no images")
            found += [(f, os.path.abspath(f)) for f in files]
        elif Path(p).is_file():
            found += [(p, os.path.abspath(p))] if Path(p).suffix.lower() in IMG_EXTENSIONS else listed(Path(p))
        else:
            raise DataError(f"source {p} does not exist; expected an image, a folder, a listing or a URI")
    if not found:
        raise DataError(f"no images in {', '.join(paths)}")
    return found


def listed(listing: Path) -> list[tuple[str, str]]:
    """A text file with a path or URI a line (blank lines and # comments skipped; relative paths are relative to the
    listing's folder)."""
    try:
        lines = listing.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read listing {listing}: {e}; expected a text file with a path or URI a line") from None
    out = []
    for line in (raw.strip() for raw in lines):
        if line and not line.startswith("#"):
            out.append((line, line if URI.match(line) else os.path.abspath(listing.parent / line)))
    if not out:
        raise DataError(f"listing {listing} names no files")
    return out


def uri_files(uri: str) -> list[tuple[str, str]]:
    """A file URI itself, or the visible images under a prefix (recursively, sorted), through pyarrow's filesystems
    and their standard credential chains."""
    from pyarrow import fs as pafs

    try:
        filesystem, root = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(root)
        if info.type == pafs.FileType.File:
            return [(uri, uri)]
        if info.type != pafs.FileType.Directory:
            raise DataError(f"{uri} does not exist")
        listing = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
        raise DataError(f"cannot list {uri}: {e}") from None
    prefix = uri[: uri.index("://") + 3]
    found = sorted(
        prefix + f.path
        for f in listing
        if f.type == pafs.FileType.File
        and Path(f.path).suffix.lower() in IMG_EXTENSIONS
        and visible(Path(f.path), Path(root))
    )
    if not found:
        raise DataError(f"{uri} holds no images")
    return [(f, f) for f in found]
