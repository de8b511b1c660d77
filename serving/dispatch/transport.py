"""How requests reach the inference workers and answers come back: ZeroMQ, with tensors as zero-copy frames.

    API server --PUSH--> broker (a thread of the main process, dispatch/broker.py) --ROUTER/DEALER--> inference worker
    inference worker --PUSH--> the API server the request came from (one socket per API server)

An API server sends the requests its event loop took in during one turn as one message: one ZeroMQ send, one broker
hop and one worker receive for all of them (under load a turn holds several; 8-10 on the benchmark's small model).
The broker hands messages out on credit: a worker asks for up to its batch size, gets what is waiting (at once, or as
it arrives), and asks again when it has answered all of it (a message holding more than its batch size is run in
several batches). So requests wait in the broker, never in a busy worker, and the broker always knows what each
worker holds: when a worker dies, what it held goes back to the front of the queue for the next worker (a message
two workers died holding is answered 503 instead), and nothing is lost. A worker whose connection is gone gets
nothing more, even before LitServe's monitor reports it dead.

Replaces LitServe's request queue, a multiprocessing Manager queue whose round trips (one per request on each side)
took a third of the API servers' and half of the workers' time, and whose reads a killed worker could strand
(BENCHMARKS.md, serving).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import secrets
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from modelship.errors import ConfigError
from modelship.serving.control.table import REFRESH
from modelship.serving.dispatch.base import fill, split_late
from modelship.serving.errors import RequestError

log = logging.getLogger(__name__)

OK, ERROR = 0, 1
MAX_ATTEMPTS = 2  # a request is handed to at most this many workers that then die


@dataclass(frozen=True)
class Addresses:
    """The IPC endpoints of one server, made before any process starts and pickled into every one."""

    requests_in: str  # API servers push here
    requests_out: str  # workers connect here
    answers: tuple[str, ...]  # one per API server, which binds it

    @classmethod
    def fresh(cls, directory: str, api_servers: int) -> Addresses:
        """Endpoints in `directory` (from `socket_directory`): short names, as a socket's path has a small limit."""
        requests_in, requests_out = (f"ipc://{path}" for path in _fit(directory, "in", "out"))
        answers = tuple(f"ipc://{path}" for path in _fit(directory, *(f"a{i}" for i in range(api_servers))))
        return cls(requests_in, requests_out, answers)


MAX_SOCKET_PATH = 103  # sun_path is 108 bytes on Linux, 104 on macOS, with a terminating zero


def socket_directory() -> str:
    """A fresh directory for one server's IPC sockets, private to its user (mode 0700). The server removes it when
    it stops: its processes are stopped, not closed, so ZeroMQ never removes the socket files itself."""
    directory = tempfile.mkdtemp(prefix="modelship-sock-")
    try:
        _fit(directory, "a999")
    except ConfigError:
        os.rmdir(directory)
        raise
    return directory


def _fit(directory: str, *names: str) -> tuple[str, ...]:
    paths = tuple(os.path.join(directory, name) for name in names)
    if max(len(os.fsencode(path)) for path in paths) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"the temporary directory {os.path.dirname(directory)} is too long a path for the server's Unix sockets "
            f"(at most {MAX_SOCKET_PATH} bytes with their names); set TMPDIR to a shorter one, e.g. TMPDIR=/tmp"
        )
    return paths


@dataclass
class Request:
    """What a worker receives: who asked, when, for which model version, and the float32 array [n, C, H, W]."""

    uid: bytes
    consumer: int
    queued_at: float
    x: np.ndarray
    key: str = ""  # the model version (models.key_of): a batch never mixes two


def encode_requests(consumer: int, key: str, items: list[tuple[bytes, np.ndarray]]) -> list[Any]:
    """One message for requests of one API server to one model version: the version as its first frame (the broker
    counts what each version has outstanding without unpickling), then (uid, array) each, arrays as frames."""
    meta = pickle.dumps((consumer, time.monotonic(), [(uid, x.shape, x.dtype.str) for uid, x in items]))
    return [key.encode(), meta, *(np.ascontiguousarray(x).data for _, x in items)]


def decode_requests(frames: list[Any]) -> list[Request]:
    key = bytes(frames[0]).decode()
    consumer, queued_at, meta = pickle.loads(frames[1])
    return [
        Request(uid, consumer, queued_at, np.frombuffer(frame, dtype=np.dtype(dtype)).reshape(shape), key)
        for (uid, shape, dtype), frame in zip(meta, frames[2:], strict=True)
    ]


def uids(frames: list[Any]) -> list[bytes]:
    """The requests in a message, by id."""
    return [uid for uid, *_ in pickle.loads(frames[1].bytes)[2]]


def size(frames: list[Any]) -> int:
    """How many requests a message holds."""
    return len(frames) - 2


def encode_answers(items: list[tuple[bytes, int, Any]]) -> list[Any]:
    """One message for one API server: (uid, status, array or error detail) per request; arrays as one frame."""
    arrays = [a for _, status, a in items if status == OK]
    meta = [(uid, status, len(a) if status == OK else 0, None if status == OK else a) for uid, status, a in items]
    body = np.concatenate(arrays) if arrays else np.zeros((0, 0), np.float32)
    return [pickle.dumps((meta, body.shape[1:], body.dtype.str)), np.ascontiguousarray(body).data]


# ------------------------------------------------------------------------------------------------ API server side


class Client:
    """In an API server process: send requests, await answers. Made in that process, inside its event loop.

    Plain ZeroMQ sockets driven by the event loop: the answers socket's descriptor is watched with `add_reader`
    and drained without blocking, and a send never blocks (no high-water mark: the broker takes messages as they
    arrive). One timer per request enforces the timeout. zmq.asyncio's futures for every send and receive, and
    asyncio.wait_for's second future per request, cost ~14 us of an API server's CPU per request (BENCHMARKS.md)."""

    def __init__(self, addresses: Addresses, consumer: int):
        self.consumer = consumer
        self.loop = asyncio.get_running_loop()
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, 0)
        self.push.connect(addresses.requests_in)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(addresses.answers[consumer])
        self.pending: dict[bytes, asyncio.Future] = {}
        self.outbox: dict[str, list[tuple[bytes, np.ndarray]]] = {}  # this turn of the event loop's, by version
        self.prefix = secrets.token_bytes(8)  # unique to this process; a counter makes each request's id
        self.count = itertools.count()
        # ZeroMQ's descriptor signals "something changed", not "a message is here": drain on every signal
        self.loop.add_reader(self.pull.fileno(), self._read)

    async def call(self, key: str, x: np.ndarray, timeout: float) -> np.ndarray:
        """Send one array to model version `key`, wait for its answer: the array, or RequestError / TimeoutError."""
        uid = self.prefix + struct.pack("!Q", next(self.count))
        future = self.loop.create_future()
        self.pending[uid] = future
        if not self.outbox:
            self.loop.call_soon(self._send)  # after every request this turn of the loop has taken in
        self.outbox.setdefault(key, []).append((uid, x))
        timer = self.loop.call_later(timeout, expire, future)
        try:
            return await future
        finally:
            timer.cancel()
            del self.pending[uid]

    def ready(self) -> bool:
        """The broker is up and at least one worker has asked it for work."""
        from modelship.serving.dispatch.broker import broker_ready

        return broker_ready()

    def _send(self) -> None:
        outbox, self.outbox = self.outbox, {}
        for key, items in outbox.items():
            self.push.send_multipart(encode_requests(self.consumer, key, items), copy=False)

    def _read(self) -> None:
        while True:
            try:
                frames = self.pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._deliver(frames)
            except Exception:  # a bad message must not stop this process's answers; its requests time out
                log.exception("an answer message could not be read")

    def _deliver(self, frames: list[Any]) -> None:
        meta, row_shape, dtype = pickle.loads(frames[0].bytes)
        # the row count, not -1: a message of errors only has no rows, and reshape cannot infer from nothing
        total = sum(rows for _, _, rows, _ in meta)
        body = np.frombuffer(frames[1].buffer, dtype=np.dtype(dtype)).reshape(total, *row_shape)
        start = 0
        for uid, status, rows, detail in meta:
            future = self.pending.get(uid)
            if status == OK:
                part, start = body[start : start + rows], start + rows
                if future is not None and not future.done():
                    future.set_result(part.copy())
            elif future is not None and not future.done():
                future.set_exception(RequestError(detail[1], detail[0]))

    def close(self) -> None:
        self.loop.remove_reader(self.pull.fileno())
        self.ctx.destroy(linger=0)


def expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


# ------------------------------------------------------------------------------------------------ worker side


class Worker:
    """In an inference worker process: take batches on credit, send each API server its answers."""

    def __init__(self, addresses: Addresses, worker_id: int, refresh: Callable[[], bytes | None] | None = None):
        # refresh(): brings this worker's models up to the model table; its status (JSON) when that changed
        self.refresh = refresh or (lambda: None)
        self.status = self.refresh() or b""  # sent with the next "ready"
        self.ctx = zmq.Context()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.IDENTITY, identity(worker_id, os.getpid()))
        self.dealer.connect(addresses.requests_out)
        self.answers = [self.ctx.socket(zmq.PUSH) for _ in addresses.answers]
        for sock, address in zip(self.answers, addresses.answers, strict=True):
            sock.connect(address)
        self.taken: list[Request] = []  # received and not yet run: the rest of a message larger than a batch
        self.received: list[bytes] = []  # sequence numbers of the messages taken since the last "ready"

    def next_batch(self, max_batch: int, window: float) -> list[Request]:
        """Up to `max_batch` requests: what is left of those taken, or else ask for more (acknowledging, by
        sequence number, every message taken before: all answered by now), wait for the first, and take what
        arrives within `window` seconds."""
        if not self.taken:
            self.taken = self._take(max_batch, window)
        batch, self.taken = self.taken[:max_batch], self.taken[max_batch:]
        return batch

    def _take(self, max_batch: int, window: float) -> list[Request]:
        status = self.refresh() or self.status  # the models may have changed while the last batch ran
        self.status = b""
        credit = struct.pack("!I", max_batch)
        self.dealer.send_multipart([b"ready", credit, b"".join(self.received), status])
        self.received = []
        while not self.dealer.poll(int(REFRESH * 1000)):
            news = self.refresh()
            if news:  # idle and loaded or unloaded a version: say so now (the same ask again, nothing to ack)
                self.dealer.send_multipart([b"ready", credit, b"", news])

        def more(wait: float, room: int) -> list[Request]:
            return self._receive() if self.dealer.poll(max(1, int(wait * 1000)) if wait > 0 else 0) else []

        return fill(self._receive(), max_batch, window, more)

    def _receive(self) -> list[Request]:
        seq, *frames = self.dealer.recv_multipart(copy=False)
        self.received.append(seq.bytes)
        return decode_requests(frames)

    def answer(self, items: list[tuple[Request, int, Any]]) -> None:
        """(request, status, array or (http status, detail)) per request, one message per API server."""
        by_consumer: dict[int, list[tuple[bytes, int, Any]]] = {}
        for req, status, value in items:
            by_consumer.setdefault(req.consumer, []).append((req.uid, status, value))
        for consumer, answers in by_consumer.items():
            self.answers[consumer].send_multipart(encode_answers(answers), copy=False)


def identity(worker_id: int, pid: int) -> bytes:
    """A worker process's name at the broker: one per incarnation (a replacement has another pid)."""
    return f"worker-{worker_id}-{pid}".encode()


def pid_of(who: bytes) -> int:
    return int(who.rsplit(b"-", 1)[1])


def serve_batches(
    worker: Worker,
    run: Callable[[list[Request]], list[np.ndarray]],
    batching: tuple[int, float, float],
    after: Callable[[], None] = lambda: None,
) -> None:
    """The worker's loop: batches in, answers out, forever; a request older than --timeout is answered 504. `after`
    runs once a batch's answers have gone (live drift's bookkeeping: off the answer path)."""
    max_batch, window, timeout = batching
    while True:
        batch = worker.next_batch(max_batch, window)
        fresh, late = split_late(batch, timeout, time.monotonic())
        items: list[tuple[Request, int, Any]] = [(r, ERROR, (504, "timed out in the queue")) for r in late]
        if fresh:
            items += [(r, *answer) for r, answer in zip(fresh, run_batch(run, fresh), strict=True)]
        worker.answer(items)
        after()


def run_batch(run: Callable[[list[Request]], list[Any]], batch: list[Request]) -> list[tuple[int, Any]]:
    """(OK, logits) per request, (ERROR, (status, detail)) for a request `run` answered with a RequestError (a model
    version this worker does not hold), or (ERROR, (500, detail)) for every one when the forward pass fails: requests
    are validated before they are queued, so a failure here is the model's."""
    try:
        return [
            (ERROR, (y.status, y.message)) if isinstance(y, RequestError) else (OK, y)
            for _, y in zip(batch, run(batch), strict=True)
        ]  # (a count mismatch fails here too)
    except Exception as e:
        log.exception("inference failed")
        return [(ERROR, (500, f"inference failed: {type(e).__name__}"))] * len(batch)
