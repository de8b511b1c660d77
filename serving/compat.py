"""Every use of LitServe's internals, in one module, with the reason for each (ARCHITECTURE.md has them as a table).

modelship uses LitServe's public API (LitAPI, LitServer, LitSpec endpoints) for what it offers — the FastAPI app,
the uvicorn API server processes, the inference worker processes and their replacement when one dies — and reaches
past it only where listed here. These names are private and move between patch releases, so modelship pins one
release (`SUPPORTED`), and at import checks every overridden name against the parameters its override expects and
the LitServe function that must still call it (`OVERRIDES`); `check_version` refuses to start on a mismatch.

1. Requests and answers travel over modelship's own ZeroMQ transport (`modelship.serving.dispatch.transport`, and the
   broker in `modelship.serving.dispatch.broker`), not over LitServe's Manager request queue and response transport: the
   Manager round trips took a third of the API servers' and half of the workers' time, and a worker killed while
   reading could strand a request. `Server` starts the broker in `_init_manager`, gives LitServe an idle response
   transport, and registers each worker process LitServe starts (`launch_inference_worker`, and the monitor's
   `launch_single_inference_worker`) with the broker, which sees its death at once. `ZMQLoop` is the worker loop.
2. `verify_worker_status` is replaced: LitServe waits for a ready worker before it starts HTTP; modelship starts
   HTTP at once so `/health` answers 503 while the workers warm up, and watches for a worker that fails to load.
3. LitServe's own `/` ("litserve running"), `/health` and info routes are removed from the app: modelship answers
   them itself (readiness from the broker's heartbeat, with HEAD). Its GZip middleware is removed (answers here are
   a few hundred bytes, and the layer costs every request), and the spec's routes are registered again without
   LitServe's per-route auth dependency, a synchronous function FastAPI runs in a thread pool on every request:
   modelship checks the API key in its own middleware.
4. `_start_server` gives each API server process its own listening socket with SO_REUSEPORT, so the kernel spreads
   new connections over them: with LitServe's one shared socket, a burst of connections often all went to one
   process while the other idled (BENCHMARKS.md, serving). It serves the app wrapped in modelship's front door
   (`front`: the guard, and CORS when asked) rather than passing those to LitServe as middlewares, which FastAPI
   would put inside its own layers, on uvicorn with read timeouts (`modelship.serving.http_api.connections`);
   and a dead API server is replaced. Each API server follows the main process through the fork hook `serve` registers
   (`modelship.serving.lifeline`).
5. `_perform_graceful_shutdown` stops every API server at once (LitServe stops them one after another, so the later
   ones kept connections alive while the first drained), and no worker is replaced once shutdown has begun (a flag
   `launch_single_inference_worker` reads): LitServe's monitor would otherwise restart the workers shutdown just
   stopped, and those would fail on the Manager being shut down, with a traceback.
6. With --in-process (`modelship.serving.dispatch.in_process`) LitServe starts no inference worker
   (`_inference_workers_config_for_api` is empty); each API server reports its own model under
   `in_process_key(i)` in `workers_setup_status`, so the setup watch reads it as it reads workers'.
7. A worker whose model did not load has logged why in one line; LitServe's `inference_worker` then logs "Error
   setting up worker N." with the whole traceback. `quiet_setup_error` drops that traceback (kept under -v).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import multiprocessing as mp
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import litserve as ls
import uvicorn
from fastapi.routing import APIRoute
from litserve.loops.base import LitLoop
from litserve.server import _Server
from litserve.specs.base import LitSpec
from litserve.utils import WorkerSetupStatus
from starlette.middleware.gzip import GZipMiddleware

from modelship.errors import ConfigError
from modelship.serving.dispatch import broker, transport

log = logging.getLogger(__name__)

SUPPORTED = ("0.2.19",)  # the exact releases the test suite ran on: hooks move between patch releases
SUPPORTED_TEXT = "litserve==0.2.19"
LITSERVE_INFO_PATH = "/litserve/info"  # where LitServe's info route is put before it is removed

__all__ = ["LitSpec", "check_version"]

# Every LitServe name modelship overrides or calls, with the parameters the override expects; and for each hook,
# the LitServe function that must still call it (a renamed hook would silently stop being called).
OVERRIDES: tuple[tuple[Any, str, tuple[str, ...], Any], ...] = (
    (ls.LitServer, "_init_manager", ("self", "num_api_servers"), ls.LitServer.run),
    (ls.LitServer, "_inference_workers_config_for_api", ("self", "api_path"), ls.LitServer.launch_inference_worker),
    (ls.LitServer, "launch_inference_worker", ("self", "lit_api"), ls.LitServer.run),
    (ls.LitServer, "launch_single_inference_worker", ("self", "lit_api", "worker_id"),
     ls.LitServer._start_worker_monitoring),
    (ls.LitServer, "_perform_graceful_shutdown", ("self", "manager", "uvicorn_workers", "shutdown_reason"),
     ls.LitServer.run),
    (ls.LitServer, "_start_server",
     ("self", "port", "num_uvicorn_servers", "log_level", "sockets", "uvicorn_worker_type", "kwargs"),
     ls.LitServer.run),
    (ls.LitServer, "verify_worker_status", ("self",), ls.LitServer.run),
    (ls.LitServer, "_prepare_app_run", ("self", "app"), None),
    (_Server, "run", ("self", "worker_id", "sockets"), None),
    (LitLoop, "__call__", ("self", "lit_api", "device", "worker_id", "request_queue", "transport",
                           "workers_setup_status", "callback_runner"), None),
)  # fmt: skip


def check_version(version: str | None = None) -> None:
    """ConfigError naming the installed and the supported LitServe when they do not fit, or the first overridden
    name that does not (checked when this module was imported)."""
    version = version or ls.__version__
    if version.split("+")[0] not in SUPPORTED:
        raise ConfigError(
            f"litserve {version} is installed, but modelship serve is tested with {SUPPORTED_TEXT} (it relies on "
            f"LitServe internals that change between releases); pip install '{SUPPORTED_TEXT}'"
        )
    if MISMATCH is not None:
        raise ConfigError(MISMATCH)


def mismatch(overrides: tuple[tuple[Any, str, tuple[str, ...], Any], ...]) -> str | None:
    """The first LitServe name that is missing, takes other parameters than its override expects, or is no longer
    called where the override relies on it; None when all fit."""
    for owner, name, params, caller in overrides:
        where = f"{owner.__module__}.{owner.__qualname__}.{name}"
        fn = getattr(owner, name, None)
        if fn is None:
            found = "is missing"
        elif tuple(inspect.signature(fn).parameters) != params:
            found = f"takes ({', '.join(inspect.signature(fn).parameters)}), expected ({', '.join(params)})"
        elif caller is not None and name not in inspect.getsource(caller):
            found = f"is no longer called by {caller.__qualname__}"
        else:
            continue
        return f"litserve {ls.__version__}: {where} {found}; modelship serve overrides it and needs {SUPPORTED_TEXT}"
    return None


SETUP_ERROR = "Error setting up worker"  # what LitServe's inference_worker logs, with a traceback, when setup raises


def _setup_error_mismatch() -> str | None:
    from litserve.loops import loops

    if SETUP_ERROR in inspect.getsource(loops.inference_worker):
        return None
    return (
        f"litserve {ls.__version__}: inference_worker no longer logs {SETUP_ERROR!r}; modelship needs {SUPPORTED_TEXT}"
    )


MISMATCH = mismatch(OVERRIDES) or _setup_error_mismatch()  # at import: a server refuses to start on it


def quiet_setup_error() -> None:
    """In a worker whose model did not load (the reason already logged in one line): LitServe's record of it keeps
    its message and loses its traceback, unless debug logging (-v) is on."""

    def one_line(record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(SETUP_ERROR) and not log.isEnabledFor(logging.DEBUG):
            record.exc_info = record.exc_text = None
        return True

    logging.getLogger("litserve.loops.loops").addFilter(one_line)


# ------------------------------------------------------------------------------------------------ 1. transport


class IdleTransport:
    """What LitServe's response reader in each API server waits on: nothing ever arrives (answers come over
    modelship's transport instead), and waiting costs nothing."""

    def send(self, item: Any, consumer_id: int) -> None:
        raise AssertionError("modelship's workers answer over modelship.serving.dispatch.transport")

    async def areceive(self, consumer_id: int | None = None, timeout: float | None = None) -> Any:
        await asyncio.Event().wait()

    def close(self, **kwargs: Any) -> None:
        pass


class ZMQLoop(LitLoop):
    """The inference worker's loop: batches from the broker, answers straight to the API servers."""

    def __call__(self, lit_api: Any, device: str, worker_id: int, *unused: Any) -> None:
        worker = transport.Worker(lit_api.addresses, worker_id, lit_api.refresh)
        transport.serve_batches(worker, lit_api.run, lit_api.max_batch_size, lit_api.batch_timeout,
                                lit_api.request_timeout)  # fmt: skip


# ------------------------------------------------------------------------------------------------ 2 and 3. server


class Server(ls.LitServer):
    """LitServer on modelship's transport, with HTTP up before the workers are warm, and modelship's own `/`."""

    def __init__(self, *args: Any, front: Callable[[Any], Any], on_worker_failure: Callable[[], None],
                 sockets: str | None, hung: broker.HungPolicy, http: type,
                 in_api_server: Callable[[Callable[[bool], None]], None] | None = None,
                 on_broker: Callable[[broker.Broker], None] | None = None, grpc: Any = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, info_path=LITSERVE_INFO_PATH, **kwargs)
        self._grpc = grpc  # the gRPC service each API server starts beside HTTP (--grpc-port), or None
        self._front = front  # wraps the FastAPI app as each API server serves it
        self._sockets = sockets  # the directory for the transport's IPC sockets (None with --in-process)
        self._hung = hung  # when the broker counts a worker as hung
        self._http = http  # uvicorn's HTTP protocol class for the API servers (timeouts for slow clients)
        self._on_worker_failure = on_worker_failure
        self._in_api_server = in_api_server  # with --in-process: starts the model in a new API server process
        self._on_broker = on_broker  # the model controller follows the workers through the broker
        self._broker: broker.Broker | None = None
        self._api_servers: dict[int, Any] = {}
        self._stopping = False
        self._lock = threading.Lock()
        routes = self.app.router.routes
        routes[:] = [r for r in routes if not _litserve_own(r, ("/", "/health", LITSERVE_INFO_PATH))]
        for i, route in enumerate(routes):
            if isinstance(route, APIRoute) and route.dependencies:  # the spec's routes, with LitServe's auth
                routes[i] = APIRoute(route.path, route.endpoint, methods=list(route.methods or ()), name=route.name)
        self.app.user_middleware = [m for m in self.app.user_middleware if m.cls is not GZipMiddleware]

    def _inference_workers_config_for_api(self, api_path: str) -> Any:
        # with --in-process the API servers run the model: LitServe starts no inference worker
        return [] if self._in_api_server is not None else super()._inference_workers_config_for_api(api_path)

    def _init_manager(self, num_api_servers: int) -> Any:
        manager = super()._init_manager(num_api_servers)
        self._transport = IdleTransport()
        if self._in_api_server is not None:
            return manager
        assert self._sockets is not None
        addresses = transport.Addresses.fresh(self._sockets, num_api_servers)
        for lit_api in self.litapi_connector:
            lit_api.addresses = addresses  # pickled into the workers, inherited by the forked API servers
            lit_api.spec.addresses = addresses
        self._broker = broker.Broker(addresses, self._hung)
        self._broker.start()
        if self._on_broker is not None:
            self._on_broker(self._broker)
        return manager

    def launch_inference_worker(self, lit_api: ls.LitAPI) -> Any:
        processes = super().launch_inference_worker(lit_api)
        for worker_id, process in enumerate(processes):
            self._watch(worker_id, process)
        return processes

    def launch_single_inference_worker(self, lit_api: ls.LitAPI, worker_id: int) -> Any:
        # LitServe's monitor calls this to replace a dead worker (the broker saw the death already, and has given
        # what it held to the next worker)
        if self._stopping:
            return self.inference_workers[self._worker_index(lit_api, worker_id)]
        process = super().launch_single_inference_worker(lit_api, worker_id)
        self._watch(worker_id, process)
        return process

    def _watch(self, worker_id: int, process: Any) -> None:
        if self._broker is not None:
            self._broker.watch(worker_id, process)

    def _perform_graceful_shutdown(self, manager: Any, uvicorn_workers: dict[int, Any],
                                   shutdown_reason: str = "normal") -> None:  # fmt: skip
        with self._lock:
            self._stopping = True
        # every API server drains at once (LitServe stops them one after another): each answers what it holds
        # with `Connection: close`, while the next would still keep its connections alive for more
        running = [p for p in uvicorn_workers.values() if p.is_alive()]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + self.uvicorn_graceful_timeout
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("API server (pid %d) did not finish in time; killing it", process.pid)
                process.kill()
        super()._perform_graceful_shutdown(manager, {}, shutdown_reason)  # the workers and the Manager

    def _worker_index(self, lit_api: ls.LitAPI, worker_id: int) -> int:
        before = 0
        for api in self.litapi_connector:
            if api is lit_api:
                return before + worker_id
            before += len(self._inference_workers_config_for_api(api.api_path))
        raise AssertionError("unknown LitAPI")

    def _start_server(self, port: int, num_uvicorn_servers: int, log_level: str, sockets: list[socket.socket],
                      uvicorn_worker_type: str, **kwargs: Any) -> dict[int, Any]:  # fmt: skip
        shared = sockets[0]
        self._listen = (shared.family, shared.getsockname()[:2], port, log_level, kwargs)
        for sock in sockets:
            sock.close()
        for consumer in range(num_uvicorn_servers):
            self._api_servers[consumer] = self._start_api_server(consumer)
        threading.Thread(target=self._replace_dead_api_servers, name="modelship-api-watch", daemon=True).start()
        return self._api_servers  # LitServe stops them at shutdown, replacements included

    def _start_api_server(self, consumer: int) -> Any:
        family, address, port, log_level, kwargs = self._listen
        if self._in_api_server is not None:  # /health is 503 until this API server's model is warm
            self.workers_setup_status[in_process_key(consumer)] = WorkerSetupStatus.STARTING
        self.app.response_queue_id = consumer
        for lit_api in self.litapi_connector:
            lit_api.spec.response_queue_id = consumer
        app = copy.copy(self.app)
        self._prepare_app_run(app)
        config = uvicorn.Config(app=self._front(app), host=address[0], port=port, log_level=log_level, http=self._http,
                                timeout_graceful_shutdown=self.uvicorn_graceful_timeout, **kwargs)  # fmt: skip
        server = APIServer(config=config, beside=self._grpc)
        own = [reuseport_socket(family, address)]
        process = mp.get_context("fork").Process(
            target=self._run_api_server, args=(server, consumer, own), name=f"LitServer-{consumer}"
        )
        process.start()
        for sock in own:
            sock.close()  # the child has it
        return process

    def _run_api_server(self, server: Any, consumer: int, own: list[socket.socket]) -> None:
        if self._in_api_server is not None:
            status, key = self.workers_setup_status, in_process_key(consumer)

            def loaded(ok: bool) -> None:
                status[key] = WorkerSetupStatus.READY if ok else WorkerSetupStatus.ERROR

            self._in_api_server(loaded)
        server.run(consumer, own)

    def _replace_dead_api_servers(self) -> None:
        """An API server that dies (a crash in native code: the runtime with --in-process, an image decoder) is
        replaced; LitServe would leave its share of the port answered by no one once every one had died."""
        while True:
            time.sleep(0.5)
            with self._lock:  # shutdown neither misses a replacement nor sees one start after it began
                if self._stopping:
                    return
                for consumer, process in list(self._api_servers.items()):
                    if not process.is_alive():
                        log.error("API server %d (pid %d) died with exit code %s; starting a new one", consumer,
                                  process.pid, process.exitcode)  # fmt: skip
                        self._api_servers[consumer] = self._start_api_server(consumer)

    def verify_worker_status(self) -> None:
        threading.Thread(target=self._watch_setup, name="modelship-setup-watch", daemon=True).start()

    def _watch_setup(self) -> None:
        while True:
            states = list(self.workers_setup_status.values())
            if any(s == WorkerSetupStatus.ERROR for s in states):
                log.error("the model failed to load (see above); shutting down")
                self._on_worker_failure()
                self._shutdown_event.set()
                return
            if states and all(s == WorkerSetupStatus.READY for s in states):
                n = len(states)
                log.info("ready: %d cop%s of the model warmed up; /health is 200", n, "y" if n == 1 else "ies")
                return
            time.sleep(0.05)


class APIServer(_Server):
    """LitServe's uvicorn server with the gRPC service (--grpc-port) started before HTTP and drained beside it: on
    SIGTERM both refuse new requests at once and answer what they hold."""

    def __init__(self, config: uvicorn.Config, beside: Any = None) -> None:
        super().__init__(config=config)
        self.beside = beside

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.beside is not None:
            await self.beside.start()
        await super().startup(sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.beside is None:
            await super().shutdown(sockets)
        else:
            await asyncio.gather(super().shutdown(sockets), self.beside.stop(self.config.timeout_graceful_shutdown))


def in_process_key(consumer: int) -> str:
    """Where an API server running the model (--in-process) reports it in LitServe's record of worker setup."""
    return f"in-process_{consumer}"


def reuseport_socket(family: socket.AddressFamily, address: tuple[str, int]) -> socket.socket:
    """A listening socket on `address` that other processes may bind too; the kernel balances connections."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _litserve_own(route: Any, paths: tuple[str, ...]) -> bool:
    """A route LitServe registered itself (its endpoints are functions local to LitServer's methods) at `paths`."""
    qualname = getattr(getattr(route, "endpoint", None), "__qualname__", "")
    return getattr(route, "path", None) in paths and qualname.startswith("LitServer.")
