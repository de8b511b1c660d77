"""The checkpoint file format: written here, read here, nowhere else.

A checkpoint is a plain dict that `torch.load(path, weights_only=True)` reads: tensors, numbers, strings, lists and
dicts only:

    format: "modelship.checkpoint", version: 1
    model: {arch, kwargs}          state_dict (plain names)      data: {classes, input_shape, mean, std, source}
    epoch, global_step, metrics, history, early_stopping          optimizer, scheduler, scaler, rng
    config, versions

It is written to a temporary file in the same directory, fsynced, and renamed over the old one, so a process killed
at any moment leaves either the previous whole file or the new whole one.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from modelship.errors import CheckpointError
from modelship.files import atomic_write
from modelship.versions import versions

FORMAT = "modelship.checkpoint"
VERSION = 1
REQUIRED = ("model", "state_dict", "data", "epoch", "global_step", "metrics")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through `atomic_write`: never a torn file at `path`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def build_checkpoint(
    *,
    model: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    data: dict[str, Any],
    progress: dict[str, Any],
    resume: dict[str, Any],
    config: dict[str, Any],
) -> dict[str, Any]:
    """The checkpoint dict (the format above), built here and nowhere else.

    `model` is {arch, kwargs}; `progress` holds epoch, global_step, metrics, history, early_stopping; `resume` holds
    the optimizer, scheduler and scaler states. The RNG states and library versions are added here.
    """
    missing = {"epoch", "global_step", "metrics"} - set(progress)
    assert not missing, f"progress lacks {missing}"
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": {"arch": model["arch"], "kwargs": dict(model["kwargs"])},
        "state_dict": state_dict,
        "data": data,
        **progress,
        "optimizer": resume["optimizer"],
        "scheduler": resume["scheduler"],
        "scaler": resume["scaler"],
        "rng": capture_rng(),
        "config": config,
        "versions": versions("torch", "torchvision"),
    }


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
