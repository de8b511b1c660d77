"""The model registry: `@register_model` factories, user factories by import path, and weight initialisation.

A checkpoint stores `{arch, kwargs}`; `build_model(arch, kwargs)` rebuilds the same nn.Module from that alone.
Every factory takes `num_classes`, `in_channels` and `image_size` (H, W) plus its own keyword arguments.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelship.errors import CheckpointError, ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    factory: Callable[..., nn.Module]
    head: str  # the classifier module, reinitialised on a class-count change and left trainable by --freeze-backbone
    pretrained: str | None = None  # torchvision weights enum name, e.g. "ResNet18_Weights"


REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, head: str, pretrained: str | None = None) -> Callable:
    """Register a factory under `name`."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        REGISTRY[name] = ModelEntry(fn, head, pretrained)
        return fn

    return wrap


@register_model("mlp", head="head")
def mlp(num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32), hidden: int = 256) -> nn.Module:
    """Two hidden layers on the flattened image."""
    return _MLP(in_channels * image_size[0] * image_size[1], hidden, num_classes)


class _MLP(nn.Module):
    def __init__(self, n_in: int, hidden: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(n_in, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Four conv blocks, pooling only while the feature map is large enough, global average pool, linear head."""

    def __init__(self, num_classes: int, in_channels: int, image_size: tuple[int, int], width: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        side = min(image_size)
        chans = [width, width, 2 * width, 4 * width]
        c_prev = in_channels
        for i, c in enumerate(chans):
            layers.append(_conv_block(c_prev, c))
            c_prev = c
            if i >= 1 and side >= 8:
                layers.append(nn.MaxPool2d(2))
                side //= 2
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_prev, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


@register_model("cnn", head="classifier")
def cnn(
    num_classes: int,
    in_channels: int = 3,
    image_size: tuple[int, int] = (32, 32),
    width: int = 32,
    dropout: float = 0.1,
) -> nn.Module:
    """A small conv net that adapts to the input's channels and size."""
    return SmallCNN(num_classes, in_channels, tuple(image_size), width, dropout)  # type: ignore[arg-type]


def _first_conv_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if conv.in_channels == in_channels:
        return conv
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        conv.stride,  # type: ignore[arg-type]
        conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )


@register_model("resnet18", head="fc", pretrained="ResNet18_Weights")
def resnet18(num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (224, 224)) -> nn.Module:
    """torchvision ResNet-18 with `num_classes` outputs and `in_channels` inputs."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = _first_conv_channels(model.conv1, in_channels)
    return model


@register_model("mobilenet_v3_small", head="classifier.3", pretrained="MobileNet_V3_Small_Weights")
def mobilenet_v3_small(num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (224, 224)) -> nn.Module:
    """torchvision MobileNetV3-Small with `num_classes` outputs and `in_channels` inputs."""
    from torchvision.models import mobilenet_v3_small as tv_mobilenet

    model = tv_mobilenet(weights=None, num_classes=num_classes)
    stem = model.features[0][0]
    assert isinstance(stem, nn.Conv2d)
    model.features[0][0] = _first_conv_channels(stem, in_channels)
    return model


def resolve_factory(arch: str) -> tuple[Callable[..., nn.Module], str | None]:
    """The factory and head name for a registry name or `package.module:factory` import path."""
    if arch in REGISTRY:
        return REGISTRY[arch].factory, REGISTRY[arch].head
    if ":" not in arch:
        raise ModelError(
            f"unknown model {arch!r}; expected one of {', '.join(sorted(REGISTRY))} or package.module:factory"
        )
    module_name, _, attr = arch.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `uvicorn main:app`: the user's own modules import from where they run
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"cannot import {module_name!r} for model {arch!r}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{module_name!r} has no callable {attr!r}; expected a function returning an nn.Module")
    return factory, None


def model_kwargs(arch: str, num_classes: int, input_shape: list[int], extra: Mapping[str, Any]) -> dict[str, Any]:
    """The full kwargs a checkpoint records: the standard ones the factory accepts, then the user's."""
    factory, _ = resolve_factory(arch)
    params = inspect.signature(factory).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    standard = {"num_classes": num_classes, "in_channels": input_shape[0], "image_size": list(input_shape[1:])}
    kwargs = {k: v for k, v in standard.items() if takes_all or k in params}
    kwargs.update(extra)
    return kwargs


def build_model(arch: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Rebuild a model from a checkpoint's `{arch, kwargs}`."""
    factory, _ = resolve_factory(arch)
    call = dict(kwargs)
    if "image_size" in call:
        call["image_size"] = tuple(call["image_size"])
    try:
        model = factory(**call)
    except TypeError as e:
        raise ModelError(f"model {arch!r} does not accept kwargs {sorted(call)}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {arch!r} returned {type(model).__name__}, expected an nn.Module")
    return model


def check_output(model: nn.Module, input_shape: list[int], num_classes: int, arch: str) -> None:
    """One forward pass on a batch of 2 to prove the model maps [N, C, H, W] to [N, num_classes]."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as e:
        raise ModelError(f"model {arch!r} fails on input [2, {', '.join(map(str, input_shape))}]: {e}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"model {arch!r} returned {shape} for a batch of 2; expected [2, {num_classes}] logits")


def head_name(model: nn.Module, arch: str) -> str:
    """The classifier module: the registry's, else the last nn.Linear of a user model."""
    _, head = resolve_factory(arch)
    if head is not None:
        return head
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"model {arch!r} has no nn.Linear head; --freeze-backbone needs one")
    return linears[-1]


def freeze_backbone(model: nn.Module, arch: str) -> list[str]:
    """Freeze everything but the head; return the names of the parameters left trainable."""
    head = head_name(model, arch)
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(head + ".")
        if p.requires_grad:
            trainable.append(name)
    return trainable


STRIP_PREFIXES = ("module.", "_orig_mod.")


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain parameter names: no DDP `module.` or torch.compile `_orig_mod.` prefixes, tensors detached on CPU."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
        out[key] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
    return out


def download(url: str, path: Path, arch: str) -> None:
    """Fetch `url` into `path` (whole or not at all), its hash checked; ModelError naming the way out offline."""
    import urllib.error

    log.info("downloading pretrained weights for %s from %s to %s", arch, url, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = HASH_IN_NAME.search(path.name)
    try:  # torch hub writes a temporary file and moves it into place once the hash matched
        torch.hub.download_url_to_file(url, str(path), prefix.group(1) if prefix else None, progress=False)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise ModelError(
            f"pretrained weights for {arch} are not in the local cache ({path}) and could not be downloaded "
            f"({getattr(e, 'reason', e)}); download {url} on a machine with network access and copy it there "
            "(TORCH_HOME moves the cache)"
        ) from None
    except RuntimeError as e:  # torch hub: 'invalid hash value'
        raise ModelError(f"the download of {url} is damaged ({e}); run again to download it anew") from None


HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")  # torchvision's file names end in the first sha256 hex digits


def load_matching(model: nn.Module, state: Mapping[str, Any], source: str) -> list[str]:
    """Load every tensor whose name and shape fit; return the keys left at their fresh initialisation.

    Used by --init-from and --pretrained: a head of another size is reinitialised and named in the log.
    """
    state = clean_state_dict(state)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not fitting:
        raise CheckpointError(
            f"{source} shares no parameter (name and shape) with this model; "
            "is it a state_dict for another architecture?"
        )
    model.load_state_dict(fitting, strict=False)
    reinit = sorted(k for k in own if k not in fitting)
    if reinit:
        log.info(
            "%s: %d tensors loaded; reinitialised (missing or other shape): %s", source, len(fitting), ", ".join(reinit)
        )
    ignored = sorted(k for k in state if k not in own)
    if ignored:
        log.info("%s: ignored keys not in this model: %s", source, ", ".join(ignored))
    return reinit


def weights_url(arch: str) -> str:
    """Where torchvision publishes `arch`'s default pretrained weights (its file name carries a sha256 prefix)."""
    import torchvision.models as tvm

    entry = REGISTRY.get(arch)
    if entry is None or entry.pretrained is None:
        have = sorted(k for k, v in REGISTRY.items() if v.pretrained)
        raise ModelError(f"--pretrained is available for {', '.join(have)}, not {arch!r}")
    return str(getattr(tvm, entry.pretrained).DEFAULT.url)


def pretrained_path(arch: str) -> Path:
    """Where torch hub caches `arch`'s weights: TORCH_HOME/hub/checkpoints/<the URL's file name>."""
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    return hub / Path(weights_url(arch)).name


def load_pretrained(model: nn.Module, arch: str) -> list[str]:
    """Load torchvision's pretrained weights: from the local cache, else downloaded there (torch hub's loader, which
    checks the file's sha256 against its name), with a clear error offline."""
    path, url = pretrained_path(arch), weights_url(arch)
    if not path.is_file():
        download(url, path, arch)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # PyTorch's own message runs to six lines of advice that does not apply here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"pretrained weights {path} cannot be read ({first}); the cached file is damaged (an interrupted "
            f"download?): delete it and download {url} again"
        ) from None
    return load_matching(model, state, f"pretrained {arch} ({path.name})")
