"""The LitServe pieces: `ModelshipSpec` (HTTP side: endpoints, validation, responses) and `ModelshipAPI` (inference
worker side: dynamic batches through the backend).

A request is parsed and validated in the API server process, then only a float32 array is queued; workers gather
arrays from many requests into one forward pass (in chunks of at most the bundle's max batch) and send each caller
its own rows back. Hooks run in LitServe's order: setup -> decode_request -> batch -> predict -> unbatch -> encode.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import pickle
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from queue import Empty
from typing import Any

import litserve as ls
import numpy as np
from fastapi import HTTPException, Request, Response
from fastapi.responses import JSONResponse
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.specs.base import LitSpec
from litserve.transport.zmq_transport import ZMQTransport
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem, WorkerSetupStatus

import modelship
from modelship.manifest import read_manifest
from modelship.serving import protocol
from modelship.serving.backends import BACKENDS, Backend
from modelship.serving.metrics import exposition, metrics

log = logging.getLogger(__name__)

Job = tuple[np.ndarray, float]  # (float32 [n, C, H, W], monotonic time the API server queued it)


@dataclass(frozen=True)
class Settings:
    """What both sides need to know; pickled into every worker process."""

    bundle: str
    backend: str
    max_batch_size: int
    batch_timeout: float
    timeout: float
    threads: int
    workers_per_device: int
    device: str
    max_payload_mb: float
    api_key: bool
    log_level: str = "info"


def public_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without this machine's paths."""
    source = {k: v for k, v in manifest["source"].items() if k != "checkpoint"}
    return {**manifest, "source": source}


def json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def handled(fn: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Client mistakes become {"error": ...} with their 4xx; anything else is logged and answered 500."""

    @functools.wraps(fn)  # FastAPI reads the endpoint's signature through __wrapped__
    async def wrapper(*args: Any, **kwargs: Any) -> Response:
        try:
            return await fn(*args, **kwargs)
        except protocol.RequestError as e:
            return json_error(e.status, e.message)
        except Exception:
            log.exception("unhandled error in %s", fn.__name__)
            return json_error(500, "internal server error; see the server log")

    return wrapper


class ModelshipSpec(LitSpec):
    """/predict, KServe v2, /info and /metrics on top of LitServe's queues."""

    def __init__(self, manifest: dict[str, Any], settings: Settings, model: protocol.ModelSpec) -> None:
        super().__init__()
        self.api_path = "/predict"
        self.settings = settings
        self.model = model
        self.manifest = public_manifest(manifest)
        platform = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}[settings.backend]
        c, h, w = model.shape
        self.v2_metadata = {
            "name": model.name,
            "versions": ["1"],
            "platform": platform,
            "inputs": [{"name": model.input_name, "datatype": "FP32", "shape": [-1, c, h, w]}],
            "outputs": [{"name": model.output_name, "datatype": "FP32", "shape": [-1, len(model.classes)]}],
        }
        self.add_endpoint("/predict", self.predict, ["POST"])
        self.add_endpoint("/info", self.info, ["GET"])
        self.add_endpoint("/metrics", self.metrics, ["GET"])
        self.add_endpoint("/v2", self.v2_server, ["GET"])
        self.add_endpoint("/v2/health/live", self.v2_live, ["GET"])
        self.add_endpoint("/v2/health/ready", self.v2_ready, ["GET"])
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            self.add_endpoint(prefix, self.v2_model, ["GET"])
            self.add_endpoint(prefix + "/ready", self.v2_model_ready, ["GET"])
            self.add_endpoint(prefix + "/infer", self.v2_infer, ["POST"])

    # LitSpec asks for these; requests arrive already decoded (a Job) and leave as arrays
    def decode_request(self, request: Any, context_kwargs: dict | None = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: dict | None = None) -> Any:
        return output

    # ------------------------------------------------------------------------------------------ plumbing

    def ready(self) -> bool:
        status = self._server.workers_setup_status if self._server is not None else {}
        return bool(status) and all(v == WorkerSetupStatus.READY for v in status.values())

    async def infer(self, x: np.ndarray) -> np.ndarray:
        """Queue one validated array and wait for its logits."""
        uid = uuid.uuid4().hex
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event)
        now = time.monotonic()
        self.request_queue.put((self.response_queue_id, uid, now, (x, now)))
        try:
            await asyncio.wait_for(event.wait(), self.settings.timeout)
        except asyncio.TimeoutError:
            self.response_buffer.pop(uid, None)
            raise protocol.RequestError(
                f"no answer within the {self.settings.timeout:g}s request timeout (--timeout)", 504
            ) from None
        response, status = self.response_buffer.pop(uid).response
        if status != LitAPIStatus.ERROR:
            return response
        if isinstance(response, bytes):
            try:
                response = pickle.loads(response)
            except Exception:
                response = None
        if isinstance(response, HTTPException):
            raise protocol.RequestError(str(response.detail), response.status_code)
        if response is None:  # the worker died; LitServe's monitor has already started a new one
            raise protocol.RequestError(
                "the inference worker stopped while handling this request and is being replaced; retry", 503
            )
        log.error("inference failed: %r", response)
        raise protocol.RequestError("inference failed; see the server log", 500)

    # ------------------------------------------------------------------------------------------ endpoints

    @handled
    async def predict(self, request: Request) -> Response:
        """One image: JSON {"image" | "inputs", "top_k"?}, multipart field `file`, or a raw image/* body."""
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=8)
            except protocol.RequestError:  # over the payload limit while streaming: 413, not a parse error
                raise
            except Exception as e:
                raise protocol.RequestError(f"the multipart body cannot be parsed ({e})") from None
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise protocol.RequestError("a multipart upload needs a file field named `file`")
            top_k = protocol.parse_top_k(form.get("top_k"), self.model)
            what = f"uploaded file {upload.filename or ''}".strip()
            req = protocol.PredictRequest(top_k, image=await upload.read(), what=what)
        elif ctype == "application/json":
            req = protocol.parse_predict_json(await request.body(), self.model)
        elif ctype.startswith("image/"):
            req = protocol.PredictRequest(self.model.default_top_k, image=await request.body())
        else:
            raise protocol.RequestError(
                f"Content-Type {ctype} is not supported; send application/json, multipart/form-data or image/*", 415
            )
        # decoding a large image takes long enough to stall every other request on this event loop
        x = req.tensor if req.tensor is not None else await asyncio.to_thread(req.to_tensor, self.model)
        logits = await self.infer(x)
        return JSONResponse(protocol.predict_response(logits[0], self.model, req.top_k))

    @handled
    async def info(self, request: Request) -> Response:
        """The manifest's public part and how this server batches."""
        return JSONResponse(
            {"model": self.manifest, "server": asdict(self.settings) | {"bundle": Path(self.settings.bundle).name}}
        )

    @handled
    async def metrics(self, request: Request) -> Response:
        body, content_type = exposition()
        return Response(body, media_type=content_type)

    @handled
    async def v2_server(self, request: Request) -> Response:
        return JSONResponse(
            {"name": "modelship", "version": modelship.__version__, "extensions": ["binary_tensor_data"]}
        )

    @handled
    async def v2_live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    @handled
    async def v2_ready(self, request: Request) -> Response:
        ready = self.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    def _model(self, name: str, version: str | None) -> None:
        if name != self.model.name:
            raise protocol.RequestError(f"unknown model {name!r}; this server serves {self.model.name!r}", 404)
        if version not in (None, "", "1"):
            raise protocol.RequestError(f"model {name!r} has no version {version!r}; its only version is '1'", 404)

    @handled
    async def v2_model(self, request: Request, name: str, version: str | None = None) -> Response:
        self._model(name, version)
        return JSONResponse(self.v2_metadata)

    @handled
    async def v2_model_ready(self, request: Request, name: str, version: str | None = None) -> Response:
        self._model(name, version)
        ready = self.ready()
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    @handled
    async def v2_infer(self, request: Request, name: str, version: str | None = None) -> Response:
        """A batch [N, C, H, W] as JSON data or with the binary tensor extension."""
        self._model(name, version)
        limit = int(self.settings.max_payload_mb * (1 << 20))
        body = protocol.decompress(await request.body(), request.headers.get("content-encoding"), limit)
        req = protocol.parse_v2_infer(body, request.headers.get("inference-header-content-length"), self.model)
        logits = await self.infer(req.tensor)
        content, headers = protocol.v2_response(logits, req, self.model)
        return Response(content, headers=headers)


class ZMQResponses(ZMQTransport):
    """LitServe's ZeroMQ response transport, with a close() that does not fail in the process that never used it."""

    def close(self, **kwargs: Any) -> None:
        if self._zmq is not None:
            self._zmq.close()

    def __reduce__(self) -> tuple:
        return ZMQResponses, (self.backend_address, self.frontend_address)


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


class ModelshipAPI(ls.LitAPI):
    """Runs in each inference worker: loads the backend, warms it up, and runs dynamic batches."""

    def __init__(self, settings: Settings, spec: ModelshipSpec) -> None:
        # always the batched loop, so a batch of one takes the same path as a batch of many
        super().__init__(
            max_batch_size=settings.max_batch_size, batch_timeout=settings.batch_timeout, spec=spec, loop=GatherLoop()
        )
        self.settings = settings
        self.chunk = spec.model.max_batch
        self.shape = spec.model.shape
        self.backend: Backend | None = None

    def setup(self, device: str) -> None:
        # a spawned worker starts with no logging configuration
        logging.basicConfig(level=self.settings.log_level.upper(), format="%(message)s")
        manifest = read_manifest(Path(self.settings.bundle))
        path = Path(self.settings.bundle) / manifest["artifacts"][self.settings.backend]["path"]
        self.backend = BACKENDS[self.settings.backend](path, device, self.settings.threads)
        # warm up at the largest batch before /health turns 200: first calls allocate and pick kernels
        for n in (self.chunk, 1, self.chunk):
            self.backend(np.zeros((n, *self.shape), np.float32))
        log.info("worker on %s ready: %s via %s", device, self.settings.backend, ", ".join(self.backend.providers))

    def decode_request(self, request: Job, **kwargs: Any) -> Job:
        return request

    def batch(self, inputs: list[Job]) -> list[Job]:
        return inputs

    def predict(self, jobs: list[Job], **kwargs: Any) -> list[np.ndarray]:
        assert self.backend is not None
        m = metrics()
        start = time.monotonic()
        for _, queued in jobs:
            m.queue.observe(start - queued)
        sizes = [len(x) for x, _ in jobs]
        x = np.concatenate([x for x, _ in jobs]) if len(jobs) > 1 else jobs[0][0]
        outs = []
        for i in range(0, len(x), self.chunk):
            part = x[i : i + self.chunk]
            outs.append(self.backend(part))
            m.batch_size.observe(len(part))
        m.batch_requests.observe(len(jobs))
        m.inference.observe(time.monotonic() - start)
        logits = np.concatenate(outs) if len(outs) > 1 else outs[0]
        return np.split(logits, np.cumsum(sizes)[:-1])

    def unbatch(self, output: list[np.ndarray]) -> list[np.ndarray]:
        return output

    def encode_response(self, output: np.ndarray, **kwargs: Any) -> np.ndarray:
        return output
