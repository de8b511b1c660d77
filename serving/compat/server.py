"""LitServer on modelship's terms: the broker instead of LitServe's Manager queues, HTTP up before the workers are warm,
an API server per SO_REUSEPORT socket with modelship's front door, every API server drained at once (the numbered
overrides of the package's docstring)."""

from __future__ import annotations

import asyncio
import copy
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
from litserve.server import _Server
from litserve.utils import WorkerSetupStatus
from starlette.middleware.gzip import GZipMiddleware

from modelship.serving.compat.worker import IdleTransport
from modelship.serving.dispatch import broker, transport

log = logging.getLogger(__name__)

LITSERVE_INFO_PATH = "/litserve/info"  # where LitServe's info route is put before it is removed


class Server(ls.LitServer):
    """LitServer on modelship's transport, with HTTP up before the workers are warm, and modelship's own `/`."""

    def __init__(
        self,
        *args: Any,
        front: Callable[[Any], Any],
        on_worker_failure: Callable[[], None],
        sockets: str | None,
        hung: broker.HungPolicy,
        http: type,
        in_api_server: Callable[[Callable[[bool], None]], None] | None = None,
        on_broker: Callable[[broker.Broker], None] | None = None,
        grpc: Any = None,
        on_exit: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, info_path=LITSERVE_INFO_PATH, **kwargs)
        self._grpc = grpc  # the gRPC service each API server starts beside HTTP (--grpc-port), or None
        self._front = front  # wraps the FastAPI app as each API server serves it
        self._sockets = sockets  # the directory for the transport's IPC sockets (None with --in-process)
        self._hung = hung  # when the broker counts a worker as hung
        self._http = http  # uvicorn's HTTP protocol class for the API servers (timeouts for slow clients)
        self._on_worker_failure = on_worker_failure
        self._in_api_server = in_api_server  # with --in-process: starts the model in a new API server process
        self._on_broker = on_broker  # the model controller follows the workers through the broker
        self._on_exit = on_exit  # in each API server, once it has stopped serving (the payload log's last records)
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
            lit_api.worker.addresses = addresses  # pickled into the workers, inherited by the forked API servers
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

    def _perform_graceful_shutdown(
        self, manager: Any, uvicorn_workers: dict[int, Any], shutdown_reason: str = "normal"
    ) -> None:
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

    def _start_server(
        self,
        port: int,
        num_uvicorn_servers: int,
        log_level: str,
        sockets: list[socket.socket],
        uvicorn_worker_type: str,
        **kwargs: Any,
    ) -> dict[int, Any]:
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
        config = uvicorn.Config(
            app=self._front(app),
            host=address[0],
            port=port,
            log_level=log_level,
            http=self._http,
            timeout_graceful_shutdown=self.uvicorn_graceful_timeout,
            **kwargs,
        )
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
        try:
            server.run(consumer, own)
        finally:  # (a forked process ends with os._exit: no atexit handler would run)
            if self._on_exit is not None:
                self._on_exit()

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
                        log.error(
                            "API server %d (pid %d) died with exit code %s; starting a new one",
                            consumer,
                            process.pid,
                            process.exitcode,
                        )
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
