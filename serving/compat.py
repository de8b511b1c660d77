"""Every use of LitServe's internals, in one module, with the reason for each.

modelship uses LitServe's public API (LitAPI, LitServer, LitSpec endpoints) for what it offers, and reaches past it
only where listed here. These names are private and may change in any release, so `check_version` refuses to start
a server on a LitServe outside the range these overrides were written and tested against.

1. Responses travel over LitServe's ZeroMQ transport (`ZMQResponses`): one IPC round trip less per message than its
   Manager queues. LitServe's own `fast_queue=True` is silently ignored in 0.2.19 and would swap the broker's
   addresses if it were not (Lightning-AI/LitServe#751), so the server wires the transport in `_init_manager`.
2. `verify_worker_status` is replaced: LitServe waits for a ready worker before it starts HTTP; modelship starts
   HTTP at once so `/health` answers 503 while the workers warm up, and watches for a worker that fails to load.
3. `GatherLoop` replaces the batched loop's request collector, which makes an IPC round trip every millisecond even
   when idle (see its docstring).
4. The spec queues requests and reads answers through LitServe's response buffer and request queue (`submit`,
   `workers_ready`): a custom LitSpec has no public way to do either.
5. LitServe's own `/` ("litserve running") and info routes are removed from the app: modelship answers `/` itself
   and has its own `/info`.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import re
import threading
import time
import uuid
from collections.abc import Callable
from queue import Empty
from typing import Any

import litserve as ls
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.specs.base import LitSpec
from litserve.transport.zmq_queue import Broker
from litserve.transport.zmq_transport import ZMQTransport
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem, WorkerSetupStatus

from modelship.errors import ConfigError

log = logging.getLogger(__name__)

SUPPORTED = ((0, 2, 19), (0, 3, 0))  # [low, high): the releases these overrides were written and tested against
SUPPORTED_TEXT = "litserve>=0.2.19,<0.3"
LITSERVE_INFO_PATH = "/litserve/info"  # where LitServe's info route is put before it is removed

__all__ = ["LitSpec", "check_version"]


def _release(version: str) -> tuple[int, ...]:
    """(0, 2, 19) from '0.2.19', '0.2.19.post1' or '0.3.0rc1' (a pre-release counts as its release)."""
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def check_version(version: str | None = None) -> None:
    """ConfigError naming the installed and the supported LitServe when they do not fit."""
    version = version or ls.__version__
    low, high = SUPPORTED
    if not low <= _release(version) < high:
        raise ConfigError(
            f"litserve {version} is installed, but modelship serve is tested with {SUPPORTED_TEXT} (it relies on "
            f"LitServe internals that change between releases); pip install '{SUPPORTED_TEXT}'"
        )


# ------------------------------------------------------------------------------------------------ 1. responses


class ZMQResponses(ZMQTransport):
    """LitServe's ZeroMQ response transport, with a close() that does not fail in the process that never used it."""

    def close(self, **kwargs: Any) -> None:
        if self._zmq is not None:
            self._zmq.close()

    def __reduce__(self) -> tuple:
        return ZMQResponses, (self.backend_address, self.frontend_address)


# ------------------------------------------------------------------------------------------------ 2 and 5. server


class Server(ls.LitServer):
    """LitServer with ZeroMQ responses, HTTP up before the workers are warm, and modelship's own `/`."""

    def __init__(self, *args: Any, on_worker_failure: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, info_path=LITSERVE_INFO_PATH, **kwargs)
        self._on_worker_failure = on_worker_failure
        self.app.router.routes[:] = [
            r for r in self.app.router.routes if not _litserve_own(r, ("/", LITSERVE_INFO_PATH))
        ]

    def _init_manager(self, num_api_servers: int) -> Any:
        manager = super()._init_manager(num_api_servers)
        broker = Broker()
        broker.start()
        self._transport = ZMQResponses(backend_address=broker.backend_address, frontend_address=broker.frontend_address)
        return manager

    def verify_worker_status(self) -> None:
        threading.Thread(target=self._watch_setup, name="modelship-setup-watch", daemon=True).start()

    def _watch_setup(self) -> None:
        while True:
            states = list(self.workers_setup_status.values())
            if any(s == WorkerSetupStatus.ERROR for s in states):
                log.error("an inference worker failed to load the model (see above); shutting down")
                self._on_worker_failure()
                self._shutdown_event.set()
                return
            if states and all(s == WorkerSetupStatus.READY for s in states):
                log.info("ready: %d worker(s) warmed up; /health is 200", len(states))
                return
            time.sleep(0.05)


def _litserve_own(route: Any, paths: tuple[str, ...]) -> bool:
    """A route LitServe registered itself (its endpoints are functions local to LitServer's methods) at `paths`."""
    qualname = getattr(getattr(route, "endpoint", None), "__qualname__", "")
    return getattr(route, "path", None) in paths and qualname.startswith("LitServer.")


# ------------------------------------------------------------------------------------------------ 3. batches


class GatherLoop(BatchedLoop):
    """LitServe's batched loop, gathering differently: wait for a first request in 10 ms slices (LitServe's own
    collector makes an IPC round trip every millisecond, even when idle), then take whatever else arrives within
    batch_timeout, up to max_batch_size.

    Why 10 ms and not longer: a worker killed while its get() is pending in the Manager process leaves that get
    behind, and the next request handed to it is lost (answered 504 at --timeout). The slice bounds that window.
    """

    FIRST_WAIT = 0.01

    def get_batch_requests(self, lit_api: ls.LitAPI, request_queue: Any, transport: Any) -> tuple[list, list]:
        payloads: list = []
        timed_out: list = []
        try:
            item = request_queue.get(timeout=self.FIRST_WAIT)
        except Empty:
            return payloads, timed_out
        deadline = time.monotonic() + lit_api.batch_timeout
        while True:
            if item == _SENTINEL_VALUE:
                raise _StopLoopError()
            response_queue_id, uid, queued_at, x = item
            # tells the server which worker holds the request, so a crash answers it instead of hanging
            self.put_response(transport, response_queue_id, uid, (), LitAPIStatus.START, LoopResponseType.REGULAR)
            if time.monotonic() - queued_at > lit_api.request_timeout:
                timed_out.append((response_queue_id, uid))
            else:
                payloads.append((response_queue_id, uid, x))
            if len(payloads) >= lit_api.max_batch_size:
                return payloads, timed_out
            remaining = deadline - time.monotonic()
            try:
                item = request_queue.get(timeout=remaining) if remaining > 0 else request_queue.get_nowait()
            except Empty:
                return payloads, timed_out


# ------------------------------------------------------------------------------------------------ 4. the spec side


class WorkerTimeout(Exception):
    """No answer within the request timeout."""


class WorkerDied(Exception):
    """The worker holding the request died; LitServe's monitor is already replacing it."""


class WorkerFailed(Exception):
    """The worker answered with an error: `status` is an HTTP status when the worker chose one, else None."""

    def __init__(self, detail: str, status: int | None = None):
        super().__init__(detail)
        self.status = status


async def submit(spec: LitSpec, payload: Any, timeout: float) -> Any:
    """Queue `payload` for the inference workers and wait for its answer; raise one of the Worker* errors."""
    uid = uuid.uuid4().hex
    event = asyncio.Event()
    spec.response_buffer[uid] = ResponseBufferItem(event=event)
    spec.request_queue.put((spec.response_queue_id, uid, time.monotonic(), payload))
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        spec.response_buffer.pop(uid, None)
        raise WorkerTimeout() from None
    response, status = spec.response_buffer.pop(uid).response
    if status != LitAPIStatus.ERROR:
        return response
    if isinstance(response, bytes):
        try:
            response = pickle.loads(response)
        except Exception:
            response = None
    if response is None:
        raise WorkerDied()
    status_code = getattr(response, "status_code", None)
    raise WorkerFailed(str(getattr(response, "detail", response)), status_code)


def workers_ready(spec: LitSpec) -> bool:
    """Every inference worker has loaded and warmed up the model."""
    status = spec._server.workers_setup_status if spec._server is not None else {}
    return bool(status) and all(v == WorkerSetupStatus.READY for v in status.values())
