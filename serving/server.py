"""The serving stage: `serve(cfg)` checks the bundle or model repository, then runs LitServe with modelship's spec,
middleware, metrics, and the model controller (modelship.serving.control.controller).

Start-up order: the LitServe version is checked; every version to load has its sha256 checked and one that failed
parity is refused before any process starts; the HTTP server comes up at once and answers /health 503 until the
inference workers have loaded every model and warmed it up at its largest batch. A worker that dies is replaced;
SIGTERM lets in-flight requests finish.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from modelship import allocator
from modelship.devices import usable_gpus
from modelship.errors import BundleError, ConfigError, ModelshipError
from modelship.serving.config import ServeConfig, Settings

log = logging.getLogger(__name__)

TORCH_BACKENDS = {"torchscript": "torch", "pt2": "torch"}  # backends that need more than the light `serve` install


class ServeError(ModelshipError):
    """The server could not load its model. Exit code 1."""

    exit_code = 1


def check_backend(cfg: ServeConfig) -> None:
    needs = TORCH_BACKENDS.get(cfg.backend)
    if needs and not importable(needs):
        raise ConfigError(
            f"--backend {cfg.backend} runs on {needs}, which is not installed here; "
            "pip install 'modelship[serve,torch]', or serve the onnx artifact"
        )


def importable(module: str) -> bool:
    """`module` can be imported here (found, without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_devices(cfg: ServeConfig) -> tuple[str, int]:
    """(accelerator, device count) for LitServe; a GPU is used only when one is really usable."""
    gpus = usable_gpus(cfg.device)
    return ("cuda", gpus) if gpus else ("cpu", 1)


def check_port(host: str, port: int, flag: str = "--port") -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({e.strerror}); is another server using it? Pick {flag}"
            ) from None


def serve(cfg: ServeConfig) -> None:
    """Run the server until SIGTERM or Ctrl+C: check what can be checked before any process starts, check every
    model version to serve, build the server, say what it serves, run it."""
    from modelship.serving import lifeline, metrics
    from modelship.serving.control.controller import Controller
    from modelship.serving.dispatch import transport
    from modelship.serving.monitoring.drift import DriftMonitor

    accelerator, n_devices = preflight(cfg)
    allocator.keep_freed_memory()  # before the API servers fork: they inherit it
    run_dir = transport.socket_directory()  # the model table and the transport's sockets
    metrics_dir = metrics.init_dir()  # before prometheus_client is imported anywhere
    try:
        controller = Controller.for_config(cfg, run_dir)
        table = controller.start_table()  # every version checked before any process starts
        failed = threading.Event()
        server = build_server(cfg, accelerator, n_devices, failed, run_dir, controller)
        on_sigterm_drain()
        if cfg.drift_window:
            DriftMonitor(run_dir, cfg.drift_window, cfg.thresholds).start()
        announce(cfg, table, accelerator, n_devices)
        lifeline.follow_in_forked_children()  # LitServe's Manager and the API servers end with this process
        servers = api_servers(cfg, n_devices)
        server.run(
            cfg.host,
            cfg.port,
            num_api_servers=servers,
            log_level=cfg.log_level,
            access_log=cfg.access_log,
            generate_client_file=False,
        )
        if failed.is_set():
            raise start_failure(run_dir, table)
    finally:
        metrics.remove_dir(metrics_dir)
        shutil.rmtree(run_dir, ignore_errors=True)


def preflight(cfg: ServeConfig) -> tuple[str, int]:
    """(accelerator, device count), once LitServe's version, the backend's runtime, the devices and the ports are
    known to fit: ConfigError (exit 2) otherwise, before anything starts."""
    from modelship.serving import compat

    compat.check_version()
    check_backend(cfg)
    accelerator, n_devices = resolve_devices(cfg)
    if cfg.in_process and accelerator == "cuda":
        raise ConfigError(
            "--in-process runs the model on the CPU (CUDA does not survive the fork that starts an API server); "
            "add --device cpu, or leave out --in-process to serve on the GPU"
        )
    check_port(cfg.host, cfg.port)
    if cfg.grpc_port is not None:
        check_port(cfg.host, cfg.grpc_port, "--grpc-port")
    return accelerator, n_devices


def announce(cfg: ServeConfig, table: Any, accelerator: str, n_devices: int) -> None:
    """The log line that says what is served, how, and where."""
    url_host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    wait = f"waiting up to {cfg.batch_timeout:g}s for more" if cfg.batch_timeout else "of what is waiting"
    n = models(cfg, n_devices)
    copies = f"the models in each of {n} API server(s)" if cfg.in_process else f"{n} worker(s)"
    held = ", ".join(f"{v.name} {v.version}" for v in table.versions.values()) or "no model yet"
    log.info(
        "serving %s (%s on %s, %s, batches of up to %d %s, model control %s) at http://%s:%d — POST /predict, "
        "POST /v2/models/{name}/infer, docs at /docs; /health turns 200 once warmed up",
        held,
        cfg.backend,
        accelerator,
        copies,
        cfg.max_batch_size,
        wait,
        cfg.model_control,
        url_host,
        cfg.port,
    )
    if cfg.grpc_port is not None:
        grpc = "inference.GRPCInferenceService, grpc.health.v1.Health"
        log.info("and KServe v2 over gRPC at %s:%d (%s)", url_host, cfg.grpc_port, grpc)


def start_failure(run_dir: str, table: Any) -> ModelshipError:
    """Why the server stopped at start, in one line: BundleError (exit 2) when every version that failed has an
    artifact its runtime refused (the bundle is at fault), ServeError (exit 1) otherwise."""
    from modelship.serving.control.table import start_failure as recorded_failure

    failed, refused = recorded_failure(run_dir)
    if not failed:
        return ServeError("a model could not be loaded; the log above says why")
    key, reason = next(iter(failed.items()))
    where = table.versions[key].path if key in table.versions else key
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    if set(failed) <= set(refused):
        return BundleError(f"bundle {where} ({key}) cannot be served: {reason}{more}")
    return ServeError(f"{key} could not be loaded: {reason}{more}")


def api_servers(cfg: ServeConfig, n_devices: int) -> int:
    """HTTP server processes: --api-servers, or one per inference worker."""
    return cfg.api_servers or n_devices * cfg.workers_per_device


def models(cfg: ServeConfig, n_devices: int) -> int:
    """Copies of the model the server runs: one per worker, or with --in-process one per API server."""
    return api_servers(cfg, n_devices) if cfg.in_process else n_devices * cfg.workers_per_device


def build_server(
    cfg: ServeConfig, accelerator: str, n_devices: int, failed: threading.Event, run_dir: str, controller: Any
) -> Any:
    """The LitServer: the data plane, the HTTP spec over it and the gRPC service, the inference worker (in worker
    processes, or in each API server with --in-process), the Guard in front of the app, the OpenAPI document."""
    from modelship.serving import compat
    from modelship.serving.dataplane import DataPlane
    from modelship.serving.dispatch import broker
    from modelship.serving.dispatch.worker import InferenceWorker
    from modelship.serving.http_api import connections
    from modelship.serving.http_api.answers import install_errors
    from modelship.serving.http_api.openapi import install_openapi
    from modelship.serving.http_api.spec import HTTPSpec

    settings = Settings.from_config(cfg, accelerator, n_devices, models(cfg, n_devices), run_dir)
    plane = DataPlane(settings)
    spec = HTTPSpec(plane)
    worker = InferenceWorker(settings)
    server = compat.Server(
        compat.WorkerAPI(worker, spec),
        accelerator=accelerator,
        devices=n_devices,
        workers_per_device=cfg.workers_per_device,
        timeout=cfg.timeout,
        restart_workers=True,
        front=lambda app: front_door(cfg, app, spec),
        on_worker_failure=failed.set,
        sockets=None if cfg.in_process else run_dir,
        hung=broker.HungPolicy(floor=cfg.hang_timeout),
        http=connections.protocol(cfg.header_timeout, cfg.body_timeout),
        in_api_server=in_api_server(plane, worker) if cfg.in_process else None,
        on_broker=controller.start,
        grpc=grpc_service(cfg, plane),
        on_exit=plane.close,
    )
    install_errors(server.app)
    install_openapi(server.app, spec)
    return server


def in_api_server(plane: Any, worker: Any) -> Callable[[Callable[[bool], None]], None]:
    """With --in-process: what each new API server process runs first, loading the models on a thread of its own
    (requests wait for them) and making that runner its data plane's dispatcher."""
    from modelship.serving.dispatch import in_process

    def start(loaded: Callable[[bool], None]) -> None:
        s = plane.settings
        batching = (s.max_batch_size, s.batch_timeout, s.timeout)
        runner = in_process.Runner(lambda: worker.setup("cpu"), worker.run, batching, loaded, worker.after)
        runner.start()
        plane.dispatcher = runner

    return start


def front_door(cfg: ServeConfig, app: Any, spec: Any) -> Any:
    """The Guard in front of the FastAPI app, and CORS in front of the Guard (a browser's preflight is answered before
    the API key is asked for)."""
    from starlette.middleware.cors import CORSMiddleware

    from modelship.serving.http_api.guard import Guard

    guarded = Guard(app, api_key=cfg.api_key, max_bytes=cfg.max_bytes, fast=spec.fast_route)
    return CORSMiddleware(guarded, **cors_options(cfg.cors_origins)) if cfg.cors_origins else guarded


def grpc_service(cfg: ServeConfig, plane: Any) -> Any:
    """The gRPC service every API server starts beside HTTP (--grpc-port), or None."""
    if cfg.grpc_port is None:
        return None
    from modelship.serving.grpc_service import Service

    return Service(plane, cfg.host, cfg.grpc_port, cfg.api_key, cfg.max_bytes)


def cors_options(origins: tuple[str, ...]) -> dict[str, Any]:
    """Browser apps on these origins may call every route, with the API key and the v2 binary headers."""
    return {
        "allow_origins": list(origins),
        "allow_methods": ["GET", "POST"],
        "allow_headers": [
            "Content-Type",
            "Content-Encoding",
            "Authorization",
            "X-API-Key",
            "Inference-Header-Content-Length",
        ],
        "expose_headers": ["Inference-Header-Content-Length"],
        "max_age": 600,
    }


def on_sigterm_drain() -> None:
    """SIGTERM drains like Ctrl+C: LitServe's shutdown on KeyboardInterrupt stops the API servers gracefully (they
    finish in-flight requests) before it stops the inference workers."""
    main_pid = os.getpid()

    def on_sigterm(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:
            # a forked API server inherited this handler; uvicorn re-raises SIGTERM after its own graceful
            # shutdown, and then the process should simply end
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
