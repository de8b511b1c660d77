"""In-process inference (`modelship serve --in-process`): each API server runs its own copy of the model on a thread
of its own, with no inference worker processes, broker or sockets in between.

The request path is then an append to a queue and one wake-up of the event loop per batch: on a small model that is
~30% more requests a second than through the workers (BENCHMARKS.md, serving). The cost is isolation: a crash in
the runtime takes its API server down with the requests it holds (the server starts a new one), where a crashed
worker process loses nothing. ONNX Runtime and torch release the GIL while they compute, so the event loop answers
other requests meanwhile. CPU only: the CUDA driver does not survive the fork that makes an API server.

Batches follow the workers' rules: up to --max-batch-size requests, those waiting (or arriving within
--batch-timeout), a request whose caller gave up is not run.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from modelship.serving.dispatch.base import fill, split_late
from modelship.serving.dispatch.transport import OK, Request, expire, run_batch
from modelship.serving.errors import RequestError

log = logging.getLogger(__name__)

Item = tuple[Request, asyncio.Future]
IDLE = 0.5  # seconds a runner with nothing to do waits before it does its bookkeeping
Answer = tuple[asyncio.Future, Any, "RequestError | None"]  # the future, its logits or its error


class Runner:
    """The model on a thread of this API server: `call` queues an array and awaits its logits (or RequestError, or
    TimeoutError), the same contract as the workers' transport client (dispatch.base.Dispatcher)."""

    def __init__(
        self,
        setup: Callable[[], None],
        run: Callable[[list[Request]], list[np.ndarray]],
        batching: tuple[int, float, float],
        loaded: Callable[[bool], None],
        after: Callable[[], None] = lambda: None,
    ):
        self.setup, self.run, self.loaded = setup, run, loaded  # loaded(ok) once the model is up or has failed
        self.after = after  # once a batch's answers are on their way (live drift's bookkeeping)
        self.max_batch, self.window, self.timeout = batching  # --max-batch-size, --batch-timeout, --timeout
        self.queue: collections.deque[Item] = collections.deque()
        self.arrived = threading.Condition()
        self.broken: RequestError | None = None  # set when the model failed to load: every call gets it
        self.up = False  # the model is loaded and warm: this API server is ready

    def ready(self) -> bool:
        return self.up

    def start(self) -> None:
        threading.Thread(target=self._main, name="modelship-inference", daemon=True).start()

    async def call(self, key: str, x: np.ndarray, timeout: float) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.arrived:
            if self.broken is not None:
                raise self.broken
            self.queue.append((Request(b"", 0, time.monotonic(), x, key), future))
            self.arrived.notify()
        timer = loop.call_later(timeout, expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _main(self) -> None:
        try:
            self.setup()
        except Exception as e:  # each version's reason is logged where it failed; serve ends with it
            log.error("the model failed to load: %s", e)
            log.debug("why", exc_info=True)
            with self.arrived:
                self.broken = RequestError("the model failed to load; the server is shutting down", 503)
                waiting, self.queue = list(self.queue), collections.deque()
            self.loaded(False)
            if waiting:
                answers: list[Answer] = [(f, None, self.broken) for _, f in waiting]
                waiting[0][1].get_loop().call_soon_threadsafe(_settle, answers)
            return
        self.up = True
        self.loaded(True)
        while True:
            batch = self._take()
            if batch:
                self._serve(batch)
            else:  # idle: the bookkeeping still runs (a window's last answers are written out)
                self.after()

    def _take(self) -> list[Item]:
        """Up to max_batch requests: those waiting once the first is here, and what arrives within the window; none
        after IDLE seconds without a request."""
        with self.arrived:
            if not self.queue and not self.arrived.wait(IDLE):
                return []
            if not self.queue:
                return []

            def more(wait: float, room: int) -> list[Item]:
                if not self.queue and wait > 0:
                    self.arrived.wait(wait)
                return [self.queue.popleft() for _ in range(min(room, len(self.queue)))]

            return fill(more(0.0, self.max_batch), self.max_batch, self.window, more)

    def _serve(self, batch: list[Item]) -> None:
        # the late rule the workers apply, and here also a caller that left (its future cancelled)
        fresh, _ = split_late([r for r, _ in batch], self.timeout, time.monotonic())
        kept = {id(r) for r in fresh}
        live = [(r, f) for r, f in batch if id(r) in kept and not f.done()]
        if not live:
            return
        outcome = run_batch(self.run, [r for r, _ in live])
        answers: list[Answer] = [
            (f, value, None) if status == OK else (f, None, RequestError(value[1], value[0]))
            for (_, f), (status, value) in zip(live, outcome, strict=True)
        ]
        live[0][1].get_loop().call_soon_threadsafe(_settle, answers)  # one wake-up of the event loop per batch
        self.after()


def _settle(answers: list[Answer]) -> None:
    for future, value, error in answers:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
