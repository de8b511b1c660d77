"""The Ray cluster: connecting (or starting one on loopback for the run) and sizing the actor pool."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from modelship.errors import DataError
from modelship.options import PredictConfig

LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps a loopback node address (ray/_private/services.py)


def is_loopback(address: str | None) -> bool:
    host = (urlsplit(address).hostname if "://" in address else address.rsplit(":", 1)[0]) if address else None
    return host in ("127.0.0.1", "localhost", "::1", "[::1]") or (host or "").startswith("127.")


def reachable(address: str) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address that answers a TCP connection within 5 s, or DataError: ray.init
    would otherwise retry an unreachable cluster for a minute before it says so."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise DataError(f"--address {address} is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise DataError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def token_auth() -> None:
    """Connect as `ray start` serves: with token authentication when a token is at hand and RAY_AUTH_MODE is not
    set. Ray 2.60's `ray start --head` turns it on then (its token in ~/.ray/auth_token), but a driver connecting to
    that cluster does not, and fails after a minute of retries."""
    token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if "RAY_AUTH_MODE" not in os.environ and (token or (Path.home() / ".ray" / "auth_token").is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def connect(address: str | None) -> Any:
    """ray, initialized: on the cluster at `address`, or a local one for the run on loopback (None)."""
    if address is None or is_loopback(address):
        os.environ.setdefault(LOOPBACK, "0")  # read when ray is first imported
    if address not in (None, "auto"):
        reachable(address)
    if address is not None:
        token_auth()
    try:
        import ray
    except ImportError:
        raise DataError("--engine ray needs Ray Data: pip install 'modelship[ray]'") from None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address is None:
            ray.init(_node_ip_address="127.0.0.1", **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise DataError(f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    return ray


def pool(ray: Any, cfg: PredictConfig) -> tuple[int, int, int]:
    """(actors, CPUs each, GPUs each), sized so the pool can never hold every CPU: an actor pool that does can wait
    forever for the CPU Ray Data's own tasks need (ray-project/ray issue 44687)."""
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if cfg.device == "cuda" and gpus < 1:
        raise DataError("--device cuda but the Ray cluster has no GPU; use --device cpu")
    on_gpu = gpus >= 1 and cfg.device != "cpu"
    most = max(0, cpus - 1) if not on_gpu else min(gpus, max(0, cpus - 1))
    if most < 1:
        raise DataError(f"the Ray cluster has {cpus} CPU(s); --engine ray needs 2: one per actor, one for Ray Data")
    actors = cfg.actors or most
    if actors > most:
        has, each = (f"{cpus} CPUs and {gpus} GPUs", "1 CPU and 1 GPU") if on_gpu else (f"{cpus} CPUs", "1 CPU")
        raise DataError(
            f"--actors {actors}: the cluster has {has}, room for {most} actor(s) of {each}"
            " with one CPU left free for Ray Data's own tasks (a pool holding every CPU can wait forever, "
            "ray-project/ray issue 44687)"
        )
    return actors, 1, 1 if on_gpu else 0
