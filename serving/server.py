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
    """Run the server until SIGTERM or Ctrl+C."""
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

    from modelship.serving import lifeline, metrics
    from modelship.serving.control import controller as control
    from modelship.serving.dispatch import transport

    allocator.keep_freed_memory()  # before the API servers fork: they inherit it
    run_dir = transport.socket_directory()  # the model table and the transport's sockets
    metrics_dir = metrics.init_dir()  # before prometheus_client is imported anywhere
    try:
        controller = control.Controller(cfg.bundle, run_dir, cfg.backend, cfg.model_control, cfg.version_policy,
                                        cfg.load_models, cfg.poll_interval, static=cfg.in_process)  # fmt: skip
        table = controller.start_table()  # every version checked before any process starts
        failed = threading.Event()
        server = build_server(cfg, accelerator, n_devices, failed, run_dir, controller)
        on_sigterm_drain()
        url_host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        wait = f"waiting up to {cfg.batch_timeout:g}s for more" if cfg.batch_timeout else "of what is waiting"
        n = models(cfg, n_devices)
        copies = f"the models in each of {n} API server(s)" if cfg.in_process else f"{n} worker(s)"
        held = ", ".join(f"{v.name} {v.version}" for v in table.versions.values()) or "no model yet"
        log.info(
            "serving %s (%s on %s, %s, batches of up to %d %s, model control %s) at http://%s:%d — POST /predict, "
            "POST /v2/models/{name}/infer, docs at /docs; /health turns 200 once warmed up",
            held, cfg.backend, accelerator, copies, cfg.max_batch_size, wait, cfg.model_control, url_host, cfg.port,
        )  # fmt: skip
        if cfg.grpc_port is not None:
            log.info("and KServe v2 over gRPC at %s:%d (inference.GRPCInferenceService, grpc.health.v1.Health)",
                     url_host, cfg.grpc_port)  # fmt: skip
        lifeline.follow_in_forked_children()  # LitServe's Manager and the API servers end with this process
        server.run(
            host=cfg.host,
            port=cfg.port,
            num_api_servers=api_servers(cfg, n_devices),
            log_level=cfg.log_level,
            generate_client_file=False,
            access_log=cfg.access_log,
        )
        if failed.is_set():
            raise start_failure(run_dir, table)
    finally:
        metrics.remove_dir(metrics_dir)
        shutil.rmtree(run_dir, ignore_errors=True)


def start_failure(run_dir: str, table: Any) -> ModelshipError:
    """Why the server stopped at start, in one line: BundleError (exit 2) when every version that failed has an
    artifact its runtime refused (the bundle is at fault), ServeError (exit 1) otherwise."""
    from modelship.serving.control import table as models

    failed, refused = models.start_failure(run_dir)
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
    cfg: ServeConfig, accelerator: str, n_devices: int, failed: threading.Event, run_dir: str, controller: Any,
) -> Any:  # fmt: skip
    """The LitServer: modelship's spec and inference API, the guard middleware, CORS when asked, the OpenAPI doc."""
    from starlette.middleware.cors import CORSMiddleware

    from modelship.serving import compat
    from modelship.serving.dataplane import DataPlane
    from modelship.serving.dispatch import broker, in_process
    from modelship.serving.dispatch.worker import InferenceWorker
    from modelship.serving.http_api import connections
    from modelship.serving.http_api.answers import install_errors
    from modelship.serving.http_api.guard import Guard
    from modelship.serving.http_api.openapi import install_openapi
    from modelship.serving.http_api.spec import HTTPSpec

    settings = Settings.from_config(cfg, accelerator, models(cfg, n_devices), run_dir)
    plane = DataPlane(settings)
    spec = HTTPSpec(plane)
    worker = InferenceWorker(settings)
    in_api_server = None
    if cfg.in_process:

        def in_api_server(loaded: Callable[[bool], None]) -> None:
            """In a new API server process: load the models on its own thread; requests wait for them."""
            batching = (settings.max_batch_size, settings.batch_timeout, settings.timeout)
            runner = in_process.Runner(lambda: worker.setup("cpu"), worker.run, batching, loaded)
            runner.start()
            plane.dispatcher = runner

    def front(app: Any) -> Any:
        """The guard in front of the FastAPI app, and CORS in front of the guard (a browser's preflight is answered
        before the API key is asked for)."""
        guarded = Guard(app, api_key=cfg.api_key, max_bytes=cfg.max_bytes, fast=spec.fast_route)
        return CORSMiddleware(guarded, **cors_options(cfg.cors_origins)) if cfg.cors_origins else guarded

    grpc = None
    if cfg.grpc_port is not None:
        from modelship.serving.grpc_service import Service

        grpc = Service(plane, cfg.host, cfg.grpc_port, cfg.api_key, cfg.max_bytes)
    server = compat.Server(
        compat.WorkerAPI(worker, spec),
        accelerator=accelerator,
        devices=n_devices,
        workers_per_device=cfg.workers_per_device,
        timeout=cfg.timeout,
        restart_workers=True,
        front=front,
        on_worker_failure=failed.set,
        sockets=None if cfg.in_process else run_dir,
        hung=broker.HungPolicy(floor=cfg.hang_timeout),
        http=connections.protocol(cfg.header_timeout, cfg.body_timeout),
        in_api_server=in_api_server,
        on_broker=controller.start,
        grpc=grpc,
    )
    install_errors(server.app)
    install_openapi(server.app, spec)
    return server


def cors_options(origins: tuple[str, ...]) -> dict[str, Any]:
    """Browser apps on these origins may call every route, with the API key and the v2 binary headers."""
    return {
        "allow_origins": list(origins),
        "allow_methods": ["GET", "POST"],
        "allow_headers": [
            "Content-Type", "Content-Encoding", "Authorization", "X-API-Key", "Inference-Header-Content-Length",
        ],
        "expose_headers": ["Inference-Header-Content-Length"],
        "max_age": 600,
    }  # fmt: skip


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
