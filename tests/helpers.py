"""Helpers shared by the tests: running the CLI, real servers, image folders, and small models with known outputs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parents[1]
KEY = "s3cret-key"  # the API key servers under test are given


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


# ---------------------------------------------------------------------------------------- image folders


def write_folder(
    root: Path, classes: dict[str, int], mode: str = "RGB", size: tuple[int, int] = (12, 10), seed: int = 0
) -> None:
    """An ImageFolder of random PNGs: {class: count}; size is (W, H) as PIL takes it."""
    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
            Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(root / name / f"{i}.png")


# ---------------------------------------------------------------------------------------- real servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def busy_port() -> Iterator[int]:
    """A loopback port another socket is listening on, for as long as the block runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    health_seen: list[int] = field(default_factory=list)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> list[int]:
        """Process ids of this server's inference workers (spawned: their command line says so)."""
        return [pid for pid in self._kids() if "spawn_main" in _read(f"/proc/{pid}/cmdline")]

    def api_servers(self) -> list[int]:
        """Process ids of this server's API servers: its children that listen on its port."""
        port = int(self.url.rsplit(":", 1)[1])
        listening = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in _read(table).splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    listening.add(f"socket:[{fields[9]}]")
        return [pid for pid in self._kids() if listening & _sockets(pid)]

    def _kids(self) -> list[int]:
        found = []
        for pid in Path("/proc").iterdir():
            stat = _read(pid / "stat") if pid.name.isdigit() else ""
            if stat and int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                found.append(int(pid.name))
        return sorted(found)


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_bytes().decode(errors="replace").replace("\0", " ")
    except OSError:
        return ""


def _sockets(pid: int) -> set[str]:
    """What a process's descriptors point to (socket:[inode] for sockets)."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                found.add(os.readlink(fd))
    return found


def wait_ready(url: str, proc: subprocess.Popen, log: Path, seen: list[int], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            status = httpx.get(url + "/health", timeout=2).status_code
            seen.append(status)
            if status == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"server not ready after {timeout}s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def running_server(bundle: Path, *args: str, env: dict[str, str] | None = None, tmp: Path) -> Iterator[Server]:
    port = free_port()
    log = tmp / f"server-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelship.cli", "serve", str(bundle), "--port", str(port), *args],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_ready(server.url, proc, log, server.health_seen)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=40)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of a test's server outlives it


def scrape(url: str, **kwargs) -> dict[str, float]:
    text = httpx.get(url + "/metrics", **kwargs).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


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


class SlowAffine(AffineIdentity):
    """AffineIdentity's answers (2x + 1) after a pile of matrix products whose sum is multiplied by zero: the same
    answers, many times slower (a version that is right and error-free, and fails only on latency). The matrix is a
    fixed buffer, not a parameter: the state_dict is AffineIdentity's."""

    def __init__(self, layers: int, width: int):
        super().__init__()
        self.layers, self.width = layers, width
        matrix = torch.randn(width, width, generator=torch.Generator().manual_seed(0)) / width**0.5
        self.register_buffer("matrix", matrix, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        h = flat.repeat(1, self.width // flat.shape[1])
        for _ in range(self.layers):
            h = torch.tanh(h @ self.matrix)
        return super().forward(x) + 0.0 * h.sum(1, keepdim=True)


def slow_affine(num_classes: int, in_channels: int = 1, image_size: tuple[int, int] = (2, 2), layers: int = 384,
                width: int = 1024) -> nn.Module:  # fmt: skip
    assert num_classes == in_channels * image_size[0] * image_size[1], "classes must equal C*H*W"
    return SlowAffine(layers, width)


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


class UpsampleNet(nn.Module):
    """Conv, 2x bilinear upsampling (an ONNX Resize), conv, average pool, linear head."""

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.a = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        x = nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.head(torch.relu(self.b(x)).mean((2, 3)))


def upsample_net(num_classes: int, in_channels: int = 3, image_size: tuple[int, int] = (32, 32)) -> nn.Module:
    return UpsampleNet(num_classes, in_channels)
