"""Helpers shared by the tests: running the CLI, tiny training flags, and small models with known outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        lines = self.err.strip().splitlines()
        return lines[-1] if lines else ""


def tiny_train_args(data_dir: Path, *extra: str) -> list[str]:
    """Flags for a training run that takes about a second on 2 CPU cores."""
    return [
        "--shapes-train", "100", "--shapes-val", "25", "--model-kwargs", '{"width": 8}',
        "--device", "cpu", "--data-dir", str(data_dir), *extra,
    ]  # fmt: skip


def run_modelship(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> Result:
    """The real console command in a subprocess (as a user runs it)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "modelship.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO,
    )  # fmt: skip
    return Result(proc.returncode, proc.stdout, proc.stderr)


def pt_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.pt")) if root.exists() else []


# ---------------------------------------------------------------------------------------- models with known outputs


class AffineIdentity(nn.Module):
    """logits = 2 * flatten(x) + 1: each output reveals its input exactly (LitServe's Linear(1,1) idea)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(2.0))
        self.bias = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) * self.weight + self.bias


def affine_identity(num_classes: int, in_channels: int = 1, image_size: tuple[int, int] = (2, 2)) -> nn.Module:
    assert num_classes == in_channels * image_size[0] * image_size[1], "classes must equal C*H*W"
    return AffineIdentity()


class SignBranch(nn.Module):
    """Data-dependent control flow: the two branches give very different outputs."""

    def __init__(self, num_classes: int = 3, n_in: int = 12):
        super().__init__()
        self.fc = nn.Linear(n_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.flatten(1))
        if x.mean() > 0:
            return y
        return -3.0 * y + 5.0


def sign_branch(num_classes: int = 3, in_channels: int = 3, image_size: tuple[int, int] = (2, 2)) -> nn.Module:
    return SignBranch(num_classes, in_channels * image_size[0] * image_size[1])


class ViewFlatten(nn.Module):
    """The classic batch trap: x.view(x.size(0), -1) after conv + BatchNorm + Dropout."""

    def __init__(self, num_classes: int, in_channels: int, image_size: tuple[int, int]):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * image_size[0] * image_size[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(x.view(x.size(0), -1)))


def view_flatten(num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (8, 8)) -> nn.Module:
    model = ViewFlatten(num_classes, in_channels, tuple(image_size))  # type: ignore[arg-type]
    # non-trivial running statistics, so eval-mode BatchNorm is really exercised
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.linspace(-1, 1, 4))
        model.bn.running_var.copy_(torch.linspace(0.5, 2, 4))
    return model


class NotAModule:
    pass


def not_a_module(num_classes: int) -> NotAModule:
    return NotAModule()


def wrong_output(num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes + 1))
