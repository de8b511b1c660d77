"""`serve(cfg)`: check the bundle, then run LitServe with the modelship spec, middleware and metrics.

Start-up order: every artifact's sha256 is checked and a bundle that failed parity is refused before any process
starts; the HTTP server comes up at once and answers /health 503 until every inference worker has loaded the model
and warmed it up at the largest batch. A worker that dies is replaced; SIGTERM lets in-flight requests finish.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelship.errors import BundleError, ConfigError, ModelshipError
from modelship.manifest import check_bundle

log = logging.getLogger(__name__)

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds
DEVICES = ("auto", "cpu", "cuda")


class ServeError(ModelshipError):
    """The server could not start its inference workers. Exit code 1."""

    exit_code = 1


@dataclass(frozen=True)
class ServeConfig:
    """Options of `modelship serve`; see README.md for each flag and BENCHMARKS.md for how defaults were chosen."""

    bundle: Path
    backend: str = "onnx"
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    batch_timeout: float = 0.002
    workers_per_device: int = 2
    api_servers: int | None = None
    threads: int | None = None
    timeout: float = 30.0
    max_payload_mb: float = 16.0
    api_key: str | None = None
    log_level: str = "info"
    access_log: bool = False

    def __post_init__(self) -> None:
        if self.backend not in ("onnx", "torchscript"):
            raise ConfigError(f"--backend must be onnx or torchscript, got {self.backend!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.host not in HOSTS:
            raise ConfigError(f"--host must be one of {', '.join(HOSTS)} (LitServe binds these), got {self.host!r}")
        if not 1024 <= self.port <= 65535:
            raise ConfigError(f"--port must be between 1024 and 65535, got {self.port}")
        if not 1 <= self.max_batch_size <= 1024:
            raise ConfigError(f"--max-batch-size must be between 1 and 1024, got {self.max_batch_size}")
        if not 0 <= self.batch_timeout < self.timeout:
            raise ConfigError(
                f"--batch-timeout must be >= 0 and below --timeout ({self.timeout}s), got {self.batch_timeout}"
            )
        if self.workers_per_device < 1:
            raise ConfigError(f"--workers-per-device must be at least 1, got {self.workers_per_device}")
        if self.api_servers is not None and self.api_servers < 1:
            raise ConfigError(f"--api-servers must be at least 1, got {self.api_servers}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        if self.timeout <= 0:
            raise ConfigError(f"--timeout must be positive, got {self.timeout}")
        if self.max_payload_mb <= 0:
            raise ConfigError(f"--max-payload-mb must be positive, got {self.max_payload_mb}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty; set MODELSHIP_API_KEY or --api-key to a non-empty value")


def load_bundle(cfg: ServeConfig) -> dict[str, Any]:
    """The manifest of a bundle whose hashes match and whose parity passed, with the wanted backend."""
    manifest = check_bundle(cfg.bundle)
    if not manifest["parity"].get("passed"):
        failed = "; ".join(manifest["parity"].get("failed", [])[:3])
        raise BundleError(f"bundle {cfg.bundle} failed its parity check at export ({failed}); it must not be served")
    if cfg.backend not in manifest["artifacts"]:
        have = ", ".join(manifest["artifacts"])
        raise ConfigError(f"--backend {cfg.backend}: bundle {cfg.bundle} has no {cfg.backend} artifact (it has {have})")
    return manifest


def resolve_devices(cfg: ServeConfig) -> tuple[str, int]:
    """(accelerator, device count) for LitServe; a GPU is used only when one is really usable."""
    if cfg.backend == "torchscript":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    else:
        from modelship.serving.backends import cuda_device_count

        gpus = cuda_device_count()
    if cfg.device == "cuda" and gpus == 0:
        raise ConfigError("--device cuda but no CUDA device is usable here; use --device cpu or auto")
    if cfg.device == "cpu" or gpus == 0:
        return "cpu", 1
    return "cuda", gpus


def check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({e.strerror}); is another server using it? Pick --port"
            ) from None


def serve(cfg: ServeConfig) -> None:
    """Run the server until SIGTERM or Ctrl+C."""
    manifest = load_bundle(cfg)
    accelerator, n_devices = resolve_devices(cfg)
    check_port(cfg.host, cfg.port)

    from modelship.serving import metrics

    metrics_dir = metrics.init_dir()  # before prometheus_client is imported anywhere
    try:
        _run(cfg, manifest, accelerator, n_devices)
    finally:
        metrics.remove_dir(metrics_dir)


def _run(cfg: ServeConfig, manifest: dict[str, Any], accelerator: str, n_devices: int) -> None:
    import litserve as ls
    from litserve.transport.zmq_queue import Broker
    from litserve.utils import WorkerSetupStatus

    from modelship.serving.api import ModelshipAPI, ModelshipSpec, Settings, ZMQResponses
    from modelship.serving.middleware import Guard
    from modelship.serving.protocol import ModelSpec

    workers = n_devices * cfg.workers_per_device
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // workers)
    settings = Settings(
        bundle=str(cfg.bundle.resolve()),
        backend=cfg.backend,
        max_batch_size=cfg.max_batch_size,
        batch_timeout=cfg.batch_timeout,
        timeout=cfg.timeout,
        threads=threads,
        workers_per_device=cfg.workers_per_device,
        device=accelerator,
        max_payload_mb=cfg.max_payload_mb,
        api_key=cfg.api_key is not None,
        log_level=cfg.log_level,
    )
    model = ModelSpec.from_manifest(manifest, max_batch=int(manifest.get("max_batch", 64)))
    spec = ModelshipSpec(manifest, settings, model)
    api = ModelshipAPI(settings, spec)
    max_bytes = int(cfg.max_payload_mb * (1 << 20))

    failed = threading.Event()

    class Server(ls.LitServer):
        def _init_manager(self, num_api_servers: int) -> Any:
            manager = super()._init_manager(num_api_servers)
            # Responses travel over ZeroMQ instead of Manager queues (one IPC round trip less per message).
            # LitServe 0.2.19's own `fast_queue=True` is silently ignored and would swap the broker's addresses
            # if it were not (Lightning-AI/LitServe#751), so it is wired here.
            broker = Broker()
            broker.start()
            self._transport = ZMQResponses(
                backend_address=broker.backend_address, frontend_address=broker.frontend_address
            )
            return manager

        def verify_worker_status(self) -> None:
            # LitServe waits here before starting HTTP; we start HTTP at once so /health answers 503 while warming
            threading.Thread(target=self._watch_setup, name="modelship-setup-watch", daemon=True).start()

        def _watch_setup(self) -> None:
            while True:
                states = list(self.workers_setup_status.values())
                if any(s == WorkerSetupStatus.ERROR for s in states):
                    log.error("an inference worker failed to load the model (see above); shutting down")
                    failed.set()
                    self._shutdown_event.set()
                    return
                if states and all(s == WorkerSetupStatus.READY for s in states):
                    log.info("ready: %d worker(s) warmed up; /health is 200", len(states))
                    return
                time.sleep(0.05)

    server = Server(
        api,
        accelerator=accelerator,
        devices=n_devices,
        workers_per_device=cfg.workers_per_device,
        timeout=cfg.timeout,
        info_path="/litserve/info",
        restart_workers=True,
        disable_openapi_url=True,
        middlewares=[(Guard, {"api_key": cfg.api_key, "max_bytes": max_bytes})],
    )

    main_pid = os.getpid()

    def on_sigterm(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:
            # a forked API server inherited this handler; uvicorn re-raises SIGTERM after its own graceful
            # shutdown, and then the process should simply end
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        # LitServe's shutdown on KeyboardInterrupt stops the API servers gracefully (they finish in-flight
        # requests) before it stops the inference workers
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    url_host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    log.info(
        "serving %s (%s on %s, %d worker(s), batches of up to %d within %gs) at http://%s:%d — POST /predict, "
        "POST /v2/models/%s/infer; /health turns 200 once warmed up",
        manifest["name"], cfg.backend, accelerator, workers, cfg.max_batch_size, cfg.batch_timeout,
        url_host, cfg.port, manifest["name"],
    )  # fmt: skip
    server.run(
        host=cfg.host,
        port=cfg.port,
        num_api_servers=cfg.api_servers,
        log_level=cfg.log_level,
        generate_client_file=False,
        access_log=cfg.access_log,
    )
    if failed.is_set():
        raise ServeError("the inference workers could not start; the log above says why")
