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
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import pydantic_core
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser
from starlette.requests import ClientDisconnect

import modelship
from modelship.manifest import read_manifest
from modelship.serving import broker, compat, lifeline, local, protocol, transport
from modelship.serving.backends import PLATFORMS, Backend, load_backend
from modelship.serving.metrics import exposition, metrics
from modelship.serving.middleware import CLIENT_CLOSED, JSON_HEADERS, Answer, Route, Scope, error_answer

log = logging.getLogger(__name__)


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
    in_process: bool
    device: str
    max_payload_mb: float
    api_key_required: bool
    main_pid: int  # the server's main process: workers exit when it is gone
    log_level: str = "info"

    @property
    def max_bytes(self) -> int:
        return int(self.max_payload_mb * (1 << 20))


def public_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without this machine's paths."""
    source = {k: v for k, v in manifest["source"].items() if k != "checkpoint"}
    return {**manifest, "source": source}


JSON_NUMBER_BYTES = 26  # the longest float32 in JSON, "-1.2345678e-38" at most, with room for ", " and exponent forms
JSON_ENVELOPE_BYTES = 1 << 16  # names, datatype, shape, parameters around the numbers
V2_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")


def raw(status: int, headers: list[tuple[bytes, bytes]], content: bytes) -> Response:
    """An Answer as a Starlette response (the routes FastAPI serves)."""
    response = Response(content, status_code=status)
    response.raw_headers = [(b"content-length", str(len(content)).encode()), *headers]
    return response


def handled(fn: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Client mistakes become {"error": ...} with their 4xx; a client gone mid-request is 499 (counted, not logged as
    an error); anything else is logged and answered 500."""

    @functools.wraps(fn)  # FastAPI reads the endpoint's signature through __wrapped__
    async def wrapper(*args: Any, **kwargs: Any) -> Response:
        try:
            return await fn(*args, **kwargs)
        except ClientDisconnect:
            log.debug("%s: the client disconnected before its request arrived", fn.__name__)
            return Response(status_code=CLIENT_CLOSED)
        except Exception as e:
            return raw(*error_answer(e))

    return wrapper


class HTTPSpec(compat.LitSpec):
    """The HTTP side: /, /predict, KServe v2, /info and /metrics on top of LitServe's queues."""

    def __init__(self, manifest: dict[str, Any], settings: Settings, model: protocol.ServedModel) -> None:
        super().__init__()
        self.api_path = "/predict"
        self.settings = settings
        self.addresses: transport.Addresses | None = None  # set by the server before the API servers fork
        # how this API server reaches the model: its own (--in-process, set by the server after the fork) or the
        # workers' transport (made on the first request, inside this process's event loop)
        self.client: transport.Client | local.Runner | None = None
        self.model = model
        self.manifest = public_manifest(manifest)
        c, h, w = model.shape
        artifact = manifest["artifacts"][settings.backend]
        datatype = {"float32": "FP32", "float16": "FP16"}[artifact.get("io", manifest["input"]["dtype"])]
        self.v2_metadata = {
            "name": model.name,
            "versions": ["1"],
            "platform": PLATFORMS[settings.backend],
            "inputs": [{"name": model.input_name, "datatype": datatype, "shape": [-1, c, h, w]}],
            "outputs": [{"name": model.output_name, "datatype": datatype, "shape": [-1, len(model.classes)]}],
        }
        # the largest JSON body a v2 request can legitimately have: the largest batch, every number at its longest
        self.max_json_bytes = model.max_batch * c * h * w * JSON_NUMBER_BYTES + JSON_ENVELOPE_BYTES
        # POST /predict and v2 infer are answered by the guard (fast_route), before FastAPI; these are the rest
        self.routes: dict[str, tuple[Route, Route | None]] = {"/predict": (Route(self.predict_body), None)}
        self.add_endpoint("/", self.root, ["GET"])
        self.add_endpoint("/health", self.health, ["GET", "HEAD"])
        self.add_endpoint("/info", self.info, ["GET"])
        self.add_endpoint("/metrics", self.metrics, ["GET"])
        self.add_endpoint("/v2", self.v2_server, ["GET"])
        self.add_endpoint("/v2/health/live", self.v2_live, ["GET", "HEAD"])
        self.add_endpoint("/v2/health/ready", self.v2_ready, ["GET", "HEAD"])
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            self.add_endpoint(prefix, self.v2_model, ["GET"])
            self.add_endpoint(prefix + "/ready", self.v2_model_ready, ["GET", "HEAD"])

    # LitSpec asks for these; modelship's endpoints talk to the workers through `infer`
    def decode_request(self, request: Any, context_kwargs: dict | None = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: dict | None = None) -> Any:
        return output

    # ------------------------------------------------------------------------------------------ plumbing

    def ready(self) -> bool:
        """This API server can answer now: its own model is loaded (--in-process), or the broker is up and at least
        one worker has asked it for work (Kubernetes' readiness: a restarting worker beside a serving one is not
        a reason to leave the load balancer)."""
        if isinstance(self.client, local.Runner):
            return self.client.up
        return broker.broker_ready()

    async def infer(self, x: np.ndarray) -> np.ndarray:
        """Send one validated array to the model (the inference workers, or this process's own) for its logits."""
        if self.client is None:
            assert self.addresses is not None
            self.client = transport.Client(self.addresses, self.response_queue_id)
        try:
            return await self.client.call(x, self.settings.timeout)
        except TimeoutError:
            raise protocol.RequestError(
                f"no answer within the {self.settings.timeout:g}s request timeout (--timeout)", 504
            ) from None
        except transport.WorkerError as e:
            if e.status >= 500:
                log.error("inference failed: %s", e.detail)
            raise protocol.RequestError(e.detail, e.status) from None

    # ------------------------------------------------------------------------------------------ endpoints

    @handled
    async def root(self, request: Request) -> Response:
        """What this server is and where to go next."""
        name = self.model.name
        return JSONResponse(
            {
                "project": "modelship",
                "version": modelship.__version__,
                "model": name,
                "backend": self.settings.backend,
                "ready": self.ready(),
                "links": {
                    "docs": "/docs",
                    "openapi": "/openapi.json",
                    "predict": "/predict",
                    "v2": f"/v2/models/{name}",
                    "health": "/health",
                    "info": "/info",
                    "metrics": "/metrics",
                },
            }
        )

    @handled
    async def health(self, request: Request) -> Response:
        """Readiness: 200 while this server can answer, else 503 (GET or HEAD, for load balancers and probes)."""
        ready = self.ready()
        return Response("ok" if ready else "not ready", status_code=200 if ready else 503)

    async def predict_body(self, headers: dict[bytes, bytes], body: bytes) -> Answer:
        """POST /predict: one image as JSON {"image" | "inputs", "top_k"?}, a multipart field `file`, or a raw image/*
        body."""
        ctype = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower().decode("latin-1")
        if ctype == "application/json":
            req = protocol.parse_predict_json(body, self.model)
        elif ctype.startswith("image/"):
            req = protocol.PredictRequest(self.model.default_top_k, image=body)
        elif ctype == "multipart/form-data":
            req = await self.parse_multipart(headers, body)
        else:
            raise protocol.RequestError(
                f"Content-Type {ctype} is not supported; send application/json, multipart/form-data or image/*", 415
            )
        return await self.answer_predict(req)

    async def parse_multipart(self, headers: dict[bytes, bytes], body: bytes) -> protocol.PredictRequest:
        async def chunks() -> Any:
            yield body

        parser = MultiPartParser(Headers(raw=list(headers.items())), chunks(), max_files=1, max_fields=8)
        try:
            form = await parser.parse()
        except Exception as e:
            raise protocol.RequestError(f"the multipart body cannot be parsed ({e})") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise protocol.RequestError("a multipart upload needs a file field named `file`")
        top_k = protocol.parse_top_k(form.get("top_k"), self.model)
        what = f"uploaded file {upload.filename or ''}".strip()
        return protocol.PredictRequest(top_k, image=await upload.read(), what=what)

    async def answer_predict(self, req: protocol.PredictRequest) -> Answer:
        # decoding a large image takes long enough to stall every other request on this event loop
        x = req.tensor if req.tensor is not None else await asyncio.to_thread(req.to_tensor, self.model)
        logits = await self.infer(x)
        return 200, JSON_HEADERS, pydantic_core.to_json(protocol.predict_response(logits[0], self.model, req.top_k))

    @handled
    async def info(self, request: Request) -> Response:
        """The manifest's public part and how this server batches."""
        return JSONResponse({"model": self.manifest, "server": self.server_info()})

    def server_info(self) -> dict[str, Any]:
        """How this server batches and runs, without this machine's paths and process ids."""
        settings = {k: v for k, v in asdict(self.settings).items() if k != "main_pid"}
        return settings | {"bundle": Path(self.settings.bundle).name}

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

    async def v2_body(self, name: str, version: str | None, headers: dict[bytes, bytes], body: bytes) -> Answer:
        """POST /v2/models/{name}[/versions/{v}]/infer: a batch [N, C, H, W] as JSON data or with the binary tensor
        extension."""
        self._model(name, version)
        encoding = headers.get(b"content-encoding")
        body = protocol.decompress(body, encoding.decode() if encoding else None, self.settings.max_bytes)
        length = headers.get(b"inference-header-content-length")
        req = protocol.parse_v2_infer(body, length.decode() if length is not None else None, self.model)
        logits = await self.infer(req.tensor)
        content, extra = protocol.v2_response(logits, req, self.model)
        return 200, [(k.encode(), v.encode()) for k, v in extra.items()], content

    def fast_route(self, scope: Scope, headers: dict[bytes, bytes]) -> Route | None:
        """The POST routes, answered by the guard itself without FastAPI's routing (BENCHMARKS.md, serving):
        /predict and a model's v2 infer. None for everything else. A v2 JSON body (no binary tensor header) may be
        no larger than the model's largest batch written out, refused before it is read or parsed."""
        if scope["method"] != "POST":
            return None
        path = scope["path"]
        routes = self.routes.get(path)
        if routes is None:
            m = V2_INFER.match(path)
            if m is None:
                return None
            routes = self.v2_routes(m.group(1), m.group(2))
            if m.group(1) == self.model.name and len(self.routes) < 8:  # the served model's paths: a bounded few
                self.routes[path] = routes
        binary, json_body = routes
        return binary if json_body is None or b"inference-header-content-length" in headers else json_body

    def v2_routes(self, name: str, version: str | None) -> tuple[Route, Route]:
        """A v2 infer path's routes: (with binary tensors, with a JSON body)."""

        async def handler(headers: dict[bytes, bytes], body: bytes) -> Answer:
            return await self.v2_body(name, version, headers, body)

        c, h, w = self.model.shape
        why = (
            f"limit for a v2 JSON request to this model (its largest batch, {self.model.max_batch} x {c}x{h}x{w} "
            "numbers); larger bodies are not a valid request"
        )
        return Route(handler), Route(handler, self.max_json_bytes, why)


class InferenceAPI(ls.LitAPI):
    """The inference worker side: loads the backend, warms it up, and runs dynamic batches."""

    def __init__(self, settings: Settings, spec: HTTPSpec) -> None:
        super().__init__(
            max_batch_size=settings.max_batch_size,
            batch_timeout=settings.batch_timeout,
            spec=spec,
            loop=compat.ZMQLoop(),
        )
        self.settings = settings
        self.chunk = spec.model.max_batch
        self.shape = spec.model.shape
        self.backend: Backend | None = None
        self.addresses: transport.Addresses | None = None  # set by the server before the workers start

    def setup(self, device: str) -> None:
        lifeline.follow(self.settings.main_pid)  # never outlive the main process
        # a spawned worker starts with no logging configuration
        logging.basicConfig(level=self.settings.log_level.upper(), format="%(message)s")
        manifest = read_manifest(Path(self.settings.bundle))
        path = Path(self.settings.bundle) / manifest["artifacts"][self.settings.backend]["path"]
        self.backend = load_backend(self.settings.backend, path, device, self.settings.threads)
        # warm up at the largest batch before /health turns 200: first calls allocate and pick kernels
        for n in (self.chunk, 1, self.chunk):
            self.backend(np.zeros((n, *self.shape), np.float32))
        log.info("model ready on %s: %s via %s", device, self.settings.backend, ", ".join(self.backend.providers))

    def run(self, requests: list[transport.Request]) -> list[np.ndarray]:
        """One dynamic batch: every request's rows through the model in chunks of at most the bundle's max batch,
        each request's logits back in order."""
        assert self.backend is not None
        m = metrics()
        start = time.monotonic()
        for r in requests:
            m.queue.observe(start - r.queued_at)
        sizes = [len(r.x) for r in requests]
        x = np.concatenate([r.x for r in requests]) if len(requests) > 1 else requests[0].x
        outs = []
        for i in range(0, len(x), self.chunk):
            part = x[i : i + self.chunk]
            outs.append(self.backend(part))
            m.batch_size.observe(len(part))
        m.batch_requests.observe(len(requests))
        m.inference.observe(time.monotonic() - start)
        logits = np.concatenate(outs) if len(outs) > 1 else outs[0]
        return np.split(logits, np.cumsum(sizes)[:-1])

    # LitAPI asks for these; modelship's loop (compat.ZMQLoop) calls `run` instead
    def decode_request(self, request: Any, **kwargs: Any) -> Any:
        return request

    def predict(self, x: Any, **kwargs: Any) -> Any:
        raise AssertionError("modelship's workers run batches through InferenceAPI.run")

    def encode_response(self, output: Any, **kwargs: Any) -> Any:
        return output
