"""Real `modelship serve` processes on loopback ports, started and stopped by the tests."""

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
import pytest
import torch

from modelship.cli import main
from tests.helpers import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        found = []
        for pid in Path("/proc").iterdir():
            if not pid.name.isdigit():
                continue
            try:
                stat = (pid / "stat").read_text()
                cmdline = (pid / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and "spawn_main" in cmdline:
                found.append(int(pid.name))
        return sorted(found)


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


@pytest.fixture(scope="session")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The tiny shapes bundle served with default settings."""
    with running_server(tiny_bundle, tmp=tmp_path_factory.mktemp("server")) as s:
        yield s


@pytest.fixture(scope="session")
def affine_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """logits = 2x + 1 over a [1, 2, 2] input: every answer shows exactly which input it belongs to."""
    from tests.helpers import affine_identity

    d = tmp_path_factory.mktemp("affine")
    torch.save(affine_identity(4).state_dict(), d / "affine.pt")
    out = d / "affine"
    code = main([
        "export", str(d / "affine.pt"), "--out", str(out), "--model", "tests.helpers:affine_identity",
        "--input-shape", "1,2,2", "--classes", "a,b,c,d", "--max-batch", "16",
    ])  # fmt: skip
    assert code == 0
    return out
