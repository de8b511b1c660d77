"""File helpers every stage shares: whole-or-nothing writes and content hashes. Standard library only."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def public_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp's 0600 would hide it from a serving user)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call `write` on a temp file beside `path`, fsync, rename over `path`, fsync the folder.

    A process killed at any moment leaves either the previous whole file or the new whole one, never a torn one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, public_mode())
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temps(directory: Path) -> None:
    """Delete the temp files a killed `atomic_write` left behind (the files themselves are always whole)."""
    for tmp in directory.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    """`data` through `atomic_write`."""
    atomic_write(path, lambda f: f.write(data))


def write_json(path: Path, data: Any) -> None:
    """JSON, indented, through `atomic_write`."""
    write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def replace_json(path: Path, data: Any) -> None:
    """JSON in one rename, without fsync: state one process writes and others read while the server runs (its run
    folder), where a reader must see a file whole but nothing must survive a crash; `atomic_write` is for that."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """What `replace_json` wrote, or None when there is none (yet) or it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
