"""Rebuild the eager model to export from a modelship checkpoint or a bare state_dict."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelship.errors import CheckpointError, ConfigError
from modelship.files import sha256_file
from modelship.preprocess import Preprocess
from modelship.training.checkpoint import is_checkpoint, is_state_dict, read_torch_file, validate
from modelship.training.models import build_model, clean_state_dict, model_kwargs, resolve_factory

log = logging.getLogger(__name__)


@dataclass
class Source:
    """The eager reference model and everything the manifest says about it."""

    model: nn.Module
    arch: str
    kwargs: dict[str, Any]
    classes: list[str]
    input_shape: list[int]
    preprocess: Preprocess
    data: dict[str, Any]  # the checkpoint's data block ({} for a bare state_dict)
    info: dict[str, Any]  # manifest `source`


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with a message listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(
        f"{k} {list(state[k].shape)} vs model {list(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_few(shapes)}")
        raise CheckpointError(f"{what} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state)


def _few(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{f', … {len(items) - n} more' if len(items) > n else ''}]"


def load_source(path: Path, overrides: dict[str, Any]) -> Source:
    """The model in eval mode, from a checkpoint (self-describing) or a state_dict plus --model/--input-shape."""
    obj = read_torch_file(path)
    digest = sha256_file(path)
    if is_checkpoint(obj):
        return _from_checkpoint(validate(obj, path), path, digest, overrides)
    if not is_state_dict(obj):
        raise CheckpointError(f"{path} is neither a modelship checkpoint nor a state_dict (a dict of name -> tensor)")
    return _from_state_dict(clean_state_dict(obj), path, digest, overrides)


def _from_checkpoint(ckpt: dict[str, Any], path: Path, digest: str, overrides: dict[str, Any]) -> Source:
    """A modelship checkpoint describes its own model and data; --model and friends are ignored."""
    arch, kwargs = ckpt["model"]["arch"], dict(ckpt["model"]["kwargs"])
    data = dict(ckpt["data"])
    given = [f"--{k.replace('_', '-')}" for k, v in overrides.items() if v is not None]
    if given:
        log.warning(
            "%s is a modelship checkpoint; ignoring %s (the checkpoint describes its model)", path, ", ".join(given)
        )
    model = build_model(arch, kwargs)
    load_strict(model, clean_state_dict(ckpt["state_dict"]), str(path))
    info = {
        "kind": "modelship.checkpoint",
        "checkpoint": str(path.resolve()),
        "sha256": digest,
        "epoch": ckpt["epoch"],
        "metrics": dict(ckpt["metrics"]),
    }
    pre = Preprocess.from_dict(data)
    return Source(model.eval(), arch, kwargs, list(data["classes"]), list(data["input_shape"]), pre, data, info)


def _from_state_dict(state: dict[str, torch.Tensor], path: Path, digest: str, overrides: dict[str, Any]) -> Source:
    """A bare state_dict: the model from --model/--input-shape, classes from --classes or the head's size."""
    arch, shape = overrides.get("model"), overrides.get("input_shape")
    if arch is None or shape is None:
        raise ConfigError(
            f"{path} is a bare state_dict: give --model and --input-shape C,H,W so the model can be rebuilt"
        )
    shape = list(shape)
    classes = list(overrides["classes"]) if overrides.get("classes") else None
    inferred = _infer_num_classes(arch, state, overrides.get("model_kwargs") or {})
    if classes and inferred is not None and len(classes) != inferred:
        raise ConfigError(f"--classes names {len(classes)} classes but the state_dict's head has {inferred} outputs")
    num_classes = len(classes) if classes else inferred
    if num_classes is None:
        raise ConfigError(
            "cannot tell the number of classes of this state_dict; "
            "pass --classes a,b,c or --model-kwargs '{\"num_classes\": N}'"
        )
    kwargs = model_kwargs(arch, num_classes, shape, overrides.get("model_kwargs") or {})
    model = build_model(arch, kwargs)
    load_strict(model, state, f"state_dict {path}")
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, *shape))
    if out.ndim != 2:
        raise ConfigError(
            f"--input-shape {shape}: the model returns shape {list(out.shape)}; expected [N, num_classes] logits"
        )
    num_classes = int(out.shape[1])
    if classes is not None and len(classes) != num_classes:
        raise ConfigError(f"--classes names {len(classes)} classes but the model has {num_classes} outputs")
    channels = shape[0]
    mean = tuple(overrides.get("mean") or (0.0,) * channels)
    std = tuple(overrides.get("std") or (1.0,) * channels)
    if len(mean) == 1:
        mean = mean * channels
    if len(std) == 1:
        std = std * channels
    try:
        pre = Preprocess(size=(shape[1], shape[2]), channels=channels, mean=mean, std=std)
    except Exception as e:
        raise ConfigError(f"--input-shape/--mean/--std: {e}") from None
    info = {"kind": "state_dict", "checkpoint": str(path.resolve()), "sha256": digest}
    return Source(model, arch, kwargs, classes or [str(i) for i in range(num_classes)], shape, pre, {}, info)


def _infer_num_classes(arch: str, state: dict[str, torch.Tensor], extra: dict[str, Any]) -> int | None:
    """num_classes from --model-kwargs, else the rows of the head's last 2-D weight; None when there is none."""
    if "num_classes" in extra:
        return int(extra["num_classes"])
    _, head = resolve_factory(arch)
    weights = [k for k, v in state.items() if k.endswith(".weight") and v.ndim == 2]
    # the registry's head if the state_dict has it; otherwise the last matrix, and load_strict names what differs
    weights = [k for k in weights if head is not None and k.startswith(head + ".")] or weights
    return int(state[weights[-1]].shape[0]) if weights else None
