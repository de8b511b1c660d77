"""The broker: a thread of the server's main process that holds waiting requests and hands them to inference
workers on credit, knowing at every moment which messages each worker holds (transport.py has the wire format).

    API server --PUSH--> broker --ROUTER/DEALER, on credit--> inference worker

Nothing accepted is lost: what a worker held when it died, or when it hung and was killed, goes back to the front
of the queue for the next worker, and a message two workers died holding is answered 503.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import zmq

from modelship.serving.dispatch.transport import (
    ERROR,
    MAX_ATTEMPTS,
    Addresses,
    encode_answers,
    identity,
    pid_of,
    size,
    uids,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HungPolicy:
    """When a worker counts as hung: it has held a message longer than `factor` times the slowest of the recent
    messages (dispatch to acknowledgement), and at least `floor` seconds."""

    floor: float = 10.0
    factor: float = 10.0
    recent: int = 64  # how many of the latest acknowledged messages set "how long a message takes"


class Broker:
    """The main process's thread that holds waiting requests and hands them to workers on credit.

    Supervised: an error in its loop is logged and the loop starts again on the same state (what it held is kept),
    and it beats a heartbeat into shared memory that the API servers read for readiness, so a broker that is gone
    or stuck fails /health instead of leaving it 200 while nothing is answered."""

    def __init__(self, addresses: Addresses, hung: HungPolicy | None = None):
        self.addresses = addresses
        self.hung = hung or HungPolicy()
        self.control: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.pulse = multiprocessing.RawArray("d", 2)  # [last beat (monotonic), workers able to answer]
        # (each live worker's last status, requests outstanding per model version), renewed with every heartbeat
        # for the model controller's thread
        self.snapshot: tuple[dict[bytes, Any], dict[bytes, int]] = ({}, {})
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="modelship-request-broker", daemon=True)

    def start(self) -> None:
        global PULSE
        PULSE = self.pulse  # forked API servers inherit it: readiness reads it (broker_ready)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the request broker did not start within 10 s")

    def watch(self, worker_id: int, process: Any) -> None:
        """A worker process was started: the broker notices its death itself (the process's sentinel), at once,
        rather than when LitServe's monitor polls (every 2 s)."""
        self.control.put(("watch", (identity(worker_id, process.pid), process.sentinel)))

    def stop(self) -> None:
        """End the broker's thread (tests; a server's broker lives as long as its process)."""
        self.control.put(("stop", None))
        self._thread.join(5)

    def _run(self) -> None:
        ctx: zmq.Context = zmq.Context.instance()
        front = ctx.socket(zmq.PULL)
        front.bind(self.addresses.requests_in)
        back = ctx.socket(zmq.ROUTER)
        back.bind(self.addresses.requests_out)
        answers = [ctx.socket(zmq.PUSH) for _ in self.addresses.answers]
        for sock, address in zip(answers, self.addresses.answers, strict=True):
            sock.connect(address)
        state = _BrokerState(back, answers, self.hung)
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        sentinels: dict[int, bytes] = {}
        self._ready.set()
        while True:
            try:
                self._loop(state, poller, front, back, sentinels)
                break  # stopped
            except Exception:
                log.exception("the request broker failed; it carries on with the requests it held")
                time.sleep(0.1)  # an error that repeats is logged ten times a second, not in a tight loop
        for sock in (front, back, *answers):
            sock.close(linger=0)

    def _loop(
        self, state: _BrokerState, poller: zmq.Poller, front: zmq.Socket, back: zmq.Socket, sentinels: dict[int, bytes]
    ) -> None:
        next_check = 0.0
        while True:
            now = time.monotonic()
            if now >= next_check:  # ten times a second, not on every message: the hot loop stays as it was
                next_check = now + CHECK_EVERY
                self.pulse[0], self.pulse[1] = now, len(state.credit)
                self.snapshot = state.snapshot()
                for who in state.hung(now):
                    log.error(
                        "inference worker %s has held a batch for over %.1f s; killing it, its requests go "
                        "to the next worker",
                        who.decode(),
                        state.threshold(),
                    )
                    if who in sentinels.values():  # only a process this server started and watches is killed
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid_of(who), signal.SIGKILL)
                    state.dead(who)
            events = dict(poller.poll(100))
            if front in events:
                for _ in range(1000):  # drain what is there without polling again for each message
                    try:
                        state.arrived(front.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
            if back in events:
                for _ in range(100):
                    try:
                        who, _, credit, acks, *status = back.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    acked = struct.unpack(f"!{len(acks) // 8}Q", acks)
                    state.ready(who, struct.unpack("!I", credit)[0], acked, status=status[0] if status else b"")
            for fd in [fd for fd in sentinels if fd in events]:  # a worker process ended
                poller.unregister(fd)
                state.dead(sentinels.pop(fd))
            while not self.control.empty():
                what, arg = self.control.get()
                if what == "stop":
                    return
                who, fd = arg
                sentinels[fd] = who
                poller.register(fd, zmq.POLLIN)
            state.dispatch()


CHECK_EVERY = 0.1  # seconds between the broker's heartbeats and its looks for hung workers
PULSE: Any = None  # the broker's heartbeat, set before the API servers fork (Broker.start)
PULSE_STALE = 2.0  # seconds without a beat after which the broker counts as gone (it beats every 0.1 s or faster)


def broker_ready() -> bool:
    """In an API server: the broker is beating and at least one worker has asked it for work and not died."""
    return PULSE is not None and time.monotonic() - PULSE[0] < PULSE_STALE and PULSE[1] >= 1


class _BrokerState:
    """Waiting messages, each worker's credit (in requests) and the messages it holds, by sequence number.

    Invariant: a message leaves `held` only when its worker acknowledges its sequence number (a worker's "ready"
    lists exactly the messages it received and answered), or when that worker dies; never on timing. A worker is
    one process: its identity carries its pid, so a replacement is a new incarnation whose "ready" can never be
    taken for its predecessor's, in whatever order the replacement's first "ready" and the old one's death arrive.
    """

    def __init__(self, back: zmq.Socket, answers: list[zmq.Socket], hung_policy: HungPolicy | None = None):
        self.back, self.answers = back, answers
        self.policy = hung_policy or HungPolicy()
        # a send to a worker whose connection is gone fails instead of vanishing: the death may be reported a
        # moment later, and a request handed to it meanwhile would count as one of its two attempts
        back.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.waiting: deque[list[Any]] = deque()
        self.credit: dict[bytes, int] = {}
        self.held: dict[bytes, dict[int, tuple[list[Any], float]]] = {}  # worker -> seq -> (message, sent at)
        self.attempts: dict[bytes, int] = {}
        self.gone: set[bytes] = set()  # incarnations that died: a "ready" of theirs still in the socket is stale
        self.took: deque[float] = deque(maxlen=self.policy.recent)  # seconds from dispatch to acknowledgement
        self.seq = itertools.count(1)
        self.status: dict[bytes, Any] = {}  # each worker's last report of the model versions it holds
        self.outstanding: dict[bytes, int] = {}  # requests waiting or held, per model version

    def arrived(self, frames: list[Any]) -> None:
        key = frames[0].bytes
        self.outstanding[key] = self.outstanding.get(key, 0) + size(frames)
        self.waiting.append(frames)

    def settled(self, frames: list[Any]) -> None:
        """A message was answered (or refused): its requests are no longer outstanding."""
        key = frames[0].bytes
        left = self.outstanding.get(key, 0) - size(frames)
        if left > 0:
            self.outstanding[key] = left
        else:
            self.outstanding.pop(key, None)

    def snapshot(self) -> tuple[dict[bytes, Any], dict[bytes, int]]:
        live = set(self.credit) | set(self.held)
        return {who: self.status.get(who) for who in live}, dict(self.outstanding)

    def ready(
        self, who: bytes, n: int, acked: tuple[int, ...] = (), now: float | None = None, status: bytes = b""
    ) -> None:
        if who in self.gone:
            return
        if status:
            self.status[who] = json.loads(status)
        now = time.monotonic() if now is None else now
        held = self.held.setdefault(who, {})
        for seq in acked:
            entry = held.pop(seq, None)
            if entry is not None:
                frames, sent = entry
                self.took.append(now - sent)
                self.settled(frames)
                if self.attempts:
                    self.attempts.pop(uids(frames)[0], None)
        # messages sent after the worker asked are on their way to it: they use up the credit it asks for now
        self.credit[who] = max(0, n - sum(size(frames) for frames, _ in held.values()))

    def dead(self, who: bytes) -> None:
        self.gone.add(who)
        self.status.pop(who, None)
        held = [frames for _, (frames, _) in sorted(self.held.pop(who, {}).items(), reverse=True)]
        self.credit.pop(who, None)
        for frames in held:  # newest first, each to the front: the oldest ends up first in line
            ids, consumer = uids(frames), pickle.loads(frames[1].bytes)[0]
            self.attempts[ids[0]] = self.attempts.get(ids[0], 0) + 1
            if self.attempts[ids[0]] >= MAX_ATTEMPTS:
                self.attempts.pop(ids[0])
                detail = "two inference workers died on this request; it is not retried again"
                self.answers[consumer].send_multipart(encode_answers([(uid, ERROR, (503, detail)) for uid in ids]))
                self.settled(frames)
            else:
                self.waiting.appendleft(frames)
        if held:
            n = sum(size(frames) for frames in held)
            log.warning("an inference worker died holding %d request(s); they go to the next worker", n)

    def threshold(self) -> float:
        """Seconds a worker may hold a message before it counts as hung."""
        slowest = max(self.took, default=0.0)
        return max(self.policy.floor, self.policy.factor * slowest)

    def hung(self, now: float) -> list[bytes]:
        """Workers holding a message for longer than the threshold."""
        limit = now - self.threshold()
        return [who for who, held in self.held.items() if any(sent < limit for _, sent in held.values())]

    def dispatch(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        while self.waiting:
            who = max(self.credit, key=self.credit.__getitem__, default=None)
            if who is None or self.credit[who] == 0:
                return
            frames = self.waiting.popleft()
            seq = next(self.seq)
            try:
                self.back.send_multipart([who, struct.pack("!Q", seq), *frames], copy=False)
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    raise
                self.waiting.appendleft(frames)  # never reached it: not an attempt, and first in line still
                del self.credit[who]  # a dead connection; its death is reported too
                continue
            self.credit[who] = max(0, self.credit[who] - size(frames))  # a message is not split
            self.held[who][seq] = (frames, now)
