"""The inference worker's side of LitServe: the LitAPI that LitServe starts in each worker process (it hands every
batch to modelship's worker, dispatch.worker), the worker loop on modelship's transport, and the one-line record of a
setup that failed."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import litserve as ls
from litserve.loops.base import LitLoop

from modelship.serving.compat.check import SETUP_ERROR
from modelship.serving.dispatch import transport

log = logging.getLogger(__name__)


class WorkerAPI(ls.LitAPI):
    """What LitServe starts in every inference worker process: `worker` (dispatch.worker.InferenceWorker) does the
    work; LitServe's own request hooks are never called (modelship's loop, ZMQLoop, runs the batches)."""

    def __init__(self, worker: Any, spec: Any) -> None:
        settings = worker.settings
        super().__init__(
            max_batch_size=settings.max_batch_size, batch_timeout=settings.batch_timeout, spec=spec, loop=ZMQLoop()
        )
        self.worker = worker

    def setup(self, device: str) -> None:
        try:
            self.worker.setup(device)
        except Exception:
            quiet_setup_error()  # the reason is logged in one line already; serve ends with it
            raise

    def decode_request(self, request: Any, **kwargs: Any) -> Any:
        return request

    def predict(self, x: Any, **kwargs: Any) -> Any:
        raise AssertionError("modelship's workers run batches through InferenceWorker.run")

    def encode_response(self, output: Any, **kwargs: Any) -> Any:
        return output


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
        models = lit_api.worker
        worker = transport.Worker(models.addresses, worker_id, models.refresh)
        batching = (lit_api.max_batch_size, lit_api.batch_timeout, lit_api.request_timeout)
        transport.serve_batches(worker, models.run, batching, models.after)
