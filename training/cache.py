"""Decoded data: every image decoded and resized once to a uint8 tensor at the training size, kept in RAM or on the
GPU, and cached on disk between runs.

The disk cache is keyed by the files' content, the size and the channel count, so changed data is never reused; a
cache entry that does not load whole, or whose recorded key differs, is rebuilt with one line saying so. The content
is read again only when a file's name, size, mtime or inode changed since it was last hashed (a record beside the
entries, as git's index and DVC keep one), and what else is worked out from the files alone (the first look at
their headers) is remembered under the same names, sizes, mtimes and inodes. Whether the
data is decoded at all follows `--data-cache`: `auto` decodes when it fits a memory budget (on the GPU when one is
used and it fits there, else in RAM), `ram`/`gpu` insist, `off` keeps the per-sample PIL/DataLoader path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelship.errors import ConfigError
from modelship.imagefolder import decode_each
from modelship.preprocess import Preprocess, to_array

log = logging.getLogger(__name__)

MODES = ("auto", "ram", "gpu", "off")
FORMAT_VERSION = 2  # 2: EXIF orientation applied, alpha composited on black
RAM_BUDGET = 0.5  # auto: the decoded data may take this share of the memory available now, at most...
RAM_CAP = 8 << 30  # ...and at most this many bytes
GPU_BUDGET = 0.3  # auto on CUDA: this share of the GPU's free memory


@dataclass
class Decoded:
    """One split as tensors: uint8 images [N, C, H, W] and int64 labels [N], on the device they are read from."""

    images: torch.Tensor
    labels: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()


def available_ram() -> int:
    """Bytes of memory available now (Linux MemAvailable; the physical size elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_place(mode: str, nbytes: int, device: str) -> str | None:
    """'gpu', 'ram' or None (the PIL path) for data of `nbytes` decoded bytes, training on `device`."""
    if mode == "gpu" and not device.startswith("cuda"):
        raise ConfigError("--data-cache gpu needs a CUDA device (training runs on the CPU here); use ram or auto")
    if mode in ("gpu", "ram"):
        return mode
    if mode == "off":
        return None
    if device.startswith("cuda") and nbytes <= GPU_BUDGET * torch.cuda.mem_get_info(torch.device(device))[0]:
        return "gpu"
    return "ram" if nbytes <= min(RAM_CAP, RAM_BUDGET * available_ram()) else None


def cache_key(files: list[str], pre: Preprocess, cache_dir: Path | None = None) -> str:
    """The content of every file (and its name within the set), the size and the channel count."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"v": FORMAT_VERSION, "size": pre.size, "channels": pre.channels, "n": len(files)}).encode())
    h.update(content_digest(files, cache_dir).encode())
    return h.hexdigest()


def stats_key(files: list[str]) -> str:
    """A hash of every file's name within the set, size, mtime and inode: it changes when a file is rewritten, added,
    removed or renamed, and reading it opens no file."""
    h = hashlib.blake2b(digest_size=16)
    for name, f in zip(_names(files), files, strict=True):
        st = os.stat(f)
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0".encode())
    return h.hexdigest()


def content_digest(files: list[str], cache_dir: Path | None) -> str:
    """A hash of every file's content and its name within the set. With a `cache_dir`, the files are read only when
    no record there holds the digest for their `stats_key`."""
    record = cache_dir / f"stat-{stats_key(files)}.json" if cache_dir is not None else None
    if record is not None and isinstance(known := _read_record(record), str):
        return known
    h = hashlib.blake2b(digest_size=16)
    for name, f in zip(_names(files), files, strict=True):
        h.update(name.encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read())
    digest = h.hexdigest()
    if record is not None:
        _write_record(record, digest)
    return digest


def _names(files: list[str]) -> list[str]:
    """Each file's path relative to the set's common folder: a set moved or copied elsewhere keys the same."""
    root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0]) if files else ""
    prefix = os.path.join(root, "")  # the scan's paths are normalised: a slice is relpath's answer, 10x sooner
    return [f[len(prefix) :] if f.startswith(prefix) else os.path.relpath(f, root) for f in files]


def remembered(cache_dir: Path, kind: str, parts: list[Any], compute: Callable[[], Any]) -> Any:
    """compute(), or what it returned before for the same `parts` (stats keys, versions, seeds: all that its answer
    depends on), as JSON: lists where it returned tuples."""
    record = cache_dir / f"{kind}-{hashlib.blake2b(json.dumps(parts).encode(), digest_size=16).hexdigest()}.json"
    known = _read_record(record)
    if known is not None:
        return known
    answer = compute()
    _write_record(record, answer)
    return answer


def _read_record(path: Path) -> Any:
    try:
        return json.loads(path.read_text())["value"]
    except (OSError, ValueError, KeyError, TypeError):  # absent, torn or foreign: worked out again
        return None


def _write_record(path: Path, value: Any) -> None:
    """Written whole or not at all (a temporary file renamed into place); a cache that cannot be written only means
    the work is done again next run."""
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"value": value}) + "\n")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def _load(entry: Path, key: str, n: int) -> np.ndarray | None:
    """The cached array, or None (with a line saying why) when it is not whole or not this data's."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        images = np.load(entry / "images.npy")
        if meta.get("key") != key or images.shape[0] != n or images.dtype != np.uint8:
            raise ValueError("it holds other data")
        return images
    except (OSError, ValueError, json.JSONDecodeError, EOFError) as e:
        log.warning("decoded cache %s is corrupt or from other data (%s); rebuilding it", entry, e)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _save(entry: Path, key: str, images: np.ndarray) -> None:
    """Write the entry into a temporary folder and rename it into place: a killed run leaves no half entry."""
    tmp = entry.parent / f".{entry.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "images.npy", images)
        (tmp / "meta.json").write_text(json.dumps({"key": key, "shape": list(images.shape)}) + "\n")
        try:
            os.replace(tmp, entry)
        except OSError:
            if not entry.is_dir():
                raise
            # another process (a DDP rank, a parallel run) put the same entry there first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def decode_files(files: list[str], pre: Preprocess, cache_dir: Path | None) -> tuple[np.ndarray, str]:
    """uint8 [N, H, W, C] of these image files at `pre`'s size and channels, from the disk cache when there is a
    valid entry (else decoded and cached); and how it was obtained."""
    if cache_dir is None:
        return decode_paths(files, pre), "decoded"
    key = cache_key(files, pre, cache_dir)
    entry = cache_dir / key
    if entry.is_dir():
        cached = _load(entry, key, len(files))
        if cached is not None:
            return cached, "cache hit"
    images = decode_paths(files, pre)
    try:
        _save(entry, key, images)
    except OSError as e:
        log.warning("cannot write the decoded cache under %s (%s); decoding again next run", cache_dir, e)
        return images, "decoded, not cached"
    return images, "decoded and cached"


def decode_paths(files: list[str], pre: Preprocess) -> np.ndarray:
    """decode_images of files on disk; every file that does not decode (a truncated one) is named, all at once."""
    return np.stack(list(decode_each(files, "images", lambda image: to_array(image, pre))))


def decode_images(images: Iterable[Any], pre: Preprocess) -> np.ndarray:
    """uint8 [N, H, W, C]: each PIL image converted and resized as the eval preprocessing does, not normalised."""
    return np.stack([to_array(im, pre) for im in images])


def check_cache_dir(path: Path) -> None:
    """A --cache-dir the user gave must be writable: say so now, not after decoding."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--cache-dir {path} is not writable ({e.strerror or e}); pick another folder") from None


def to_tensors(arrays: np.ndarray, labels: list[int], device: torch.device) -> Decoded:
    """One decoded split as tensors [N, C, H, W] on `device`."""
    images = torch.from_numpy(np.ascontiguousarray(arrays.transpose(0, 3, 1, 2)))
    return Decoded(images.to(device), torch.tensor(labels, dtype=torch.int64, device=device))
