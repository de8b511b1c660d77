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

from modelship.serving.dispatch.transport import OK, Request, WorkerError, expire, run_batch

log = logging.getLogger(__name__)

Item = tuple[Request, asyncio.Future]
Answer = tuple[asyncio.Future, Any, "WorkerError | None"]  # the future, its logits or its error


class Runner:
    """The model on a thread of this API server: `call` queues an array and awaits its logits (or WorkerError, or
    TimeoutError), the same contract as the workers' transport client."""

    def __init__(self, setup: Callable[[], None], run: Callable[[list[Request]], list[np.ndarray]],
                 max_batch: int, window: float, loaded: Callable[[bool], None]):  # fmt: skip
        self.setup, self.run, self.loaded = setup, run, loaded  # loaded(ok) once the model is up or has failed
        self.max_batch, self.window = max_batch, window
        self.queue: collections.deque[Item] = collections.deque()
        self.ready = threading.Condition()
        self.broken: WorkerError | None = None  # set when the model failed to load: every call gets it
        self.up = False  # the model is loaded and warm: this API server is ready

    def start(self) -> None:
        threading.Thread(target=self._main, name="modelship-inference", daemon=True).start()

    async def call(self, key: str, x: np.ndarray, timeout: float) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.ready:
            if self.broken is not None:
                raise self.broken
            self.queue.append((Request(b"", 0, time.monotonic(), x, key), future))
            self.ready.notify()
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
            with self.ready:
                self.broken = WorkerError(503, "the model failed to load; the server is shutting down")
                waiting, self.queue = list(self.queue), collections.deque()
            self.loaded(False)
            if waiting:
                answers: list[Answer] = [(f, None, self.broken) for _, f in waiting]
                waiting[0][1].get_loop().call_soon_threadsafe(_settle, answers)
            return
        self.up = True
        self.loaded(True)
        while True:
            self._serve(self._take())

    def _take(self) -> list[Item]:
        """Up to max_batch requests: those waiting once the first is here, and what arrives within the window."""
        with self.ready:
            while not self.queue:
                self.ready.wait()
            deadline = time.monotonic() + self.window
            while len(self.queue) < self.max_batch and (remaining := deadline - time.monotonic()) > 0:
                self.ready.wait(remaining)
            return [self.queue.popleft() for _ in range(min(self.max_batch, len(self.queue)))]

    def _serve(self, batch: list[Item]) -> None:
        live = [(r, f) for r, f in batch if not f.done()]  # a caller that timed out is not run
        if not live:
            return
        outcome = run_batch(self.run, [r for r, _ in live])
        answers: list[Answer] = [
            (f, value, None) if status == OK else (f, None, WorkerError(*value))
            for (_, f), (status, value) in zip(live, outcome, strict=True)
        ]
        live[0][1].get_loop().call_soon_threadsafe(_settle, answers)  # one wake-up of the event loop per batch


def _settle(answers: list[Answer]) -> None:
    for future, value, error in answers:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
