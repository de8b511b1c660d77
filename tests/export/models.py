"""Models torch.jit.script cannot compile: one that traces cleanly, one whose trace would bake in a branch."""

from __future__ import annotations

import functools

import torch
from torch import nn


class Unscriptable(nn.Module):
    def __init__(self, num_classes: int, n_in: int):
        super().__init__()
        self.a = nn.Linear(n_in, num_classes)
        self.b = nn.Linear(n_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        # a lambda: TorchScript cannot compile it, the tracer records the additions
        return functools.reduce(lambda acc, layer: acc + layer(x), [self.a, self.b], torch.zeros(()))


class UnscriptableBranch(Unscriptable):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if float(x.mean()) > 0:  # data-dependent: a trace would keep one branch only
            return y
        return -y


def unscriptable(num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (4, 4)) -> nn.Module:
    return Unscriptable(num_classes, in_channels * image_size[0] * image_size[1])


def unscriptable_branch(num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (4, 4)) -> nn.Module:
    return UnscriptableBranch(num_classes, in_channels * image_size[0] * image_size[1])
