"""The checkpoint file format: written here, read here, nowhere else.

A checkpoint is a plain dict that `torch.load(path, weights_only=True)` reads: tensors, numbers, strings, lists and
dicts only. It is written to a temporary file in the same directory, fsynced, and renamed over the old one, so a
process killed at any moment leaves either the previous whole file or the new whole one.
"""

from __future__ import annotations

import os
import pickle
import random
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from modelship.errors import CheckpointError
from modelship.manifest import public_mode

FORMAT = "modelship.checkpoint"
VERSION = 1
REQUIRED = ("model", "state_dict", "data", "epoch", "global_step", "metrics")


def versions() -> dict[str, str]:
    """Library versions recorded in checkpoints and manifests."""
    import torchvision

    import modelship

    return {
        "modelship": modelship.__version__,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": sys.version.split()[0],
    }


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file beside `path`, fsync, then os.replace: never a torn file at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, public_mode())
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
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
    """Delete temp files a killed writer left behind (the checkpoints themselves are always whole)."""
    for tmp in directory.glob(".*.pt.*.tmp"):
        tmp.unlink(missing_ok=True)


def read_torch_file(path: Path) -> Any:
    """torch.load(weights_only=True) with errors that say what the file is and what was expected."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; expected a file written by torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} needs arbitrary unpickling to load ({first}); refused: modelship loads weights_only. "
            "Save a state_dict (torch.save(model.state_dict(), path)) instead of a pickled object"
        ) from None
    except Exception as e:  # the unpickler fails in many ways on a file that is not torch.save output
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({detail})") from None


def is_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def validate(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """Check a loaded dict is a checkpoint of a version this code reads."""
    if not is_checkpoint(ckpt):
        if is_state_dict(ckpt):
            raise CheckpointError(
                f"{path} is a bare state_dict, not a modelship checkpoint; give --model, --input-shape "
                "(and --model-kwargs, --classes) so the model can be rebuilt"
            )
        raise CheckpointError(f"{path} is not a modelship checkpoint (no format: {FORMAT!r})")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is checkpoint version {ckpt.get('version')!r}; this modelship reads version {VERSION}"
        )
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks checkpoint keys {missing}")
    return ckpt


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and validate a modelship checkpoint."""
    return validate(read_torch_file(path), path)


# --------------------------------------------------------------------------------------------------- RNG state


def capture_rng() -> dict[str, Any]:
    """Every RNG a training step can touch, as tensors and plain lists (weights_only-safe)."""
    np_state = cast(tuple, np.random.get_state(legacy=True))
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
