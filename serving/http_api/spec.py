"""The HTTP side of LitServe: `HTTPSpec` (endpoints, validation, responses) for every model version the server holds.

A request is parsed and validated in the API server against the version it is routed to (control.catalog); then
only a float32 array is queued, for the workers' forward passes of that version (dispatch.worker).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import pydantic_core
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser
from starlette.requests import ClientDisconnect

import modelship
from modelship.scores import prediction
from modelship.serving import compat, v2
from modelship.serving.control.catalog import Served
from modelship.serving.control.table import READY
from modelship.serving.dataplane import DataPlane
from modelship.serving.errors import RequestError
from modelship.serving.http_api import codec
from modelship.serving.http_api.guard import CLIENT_CLOSED, JSON_HEADERS, Answer, Route, Scope, error_answer, too_large
from modelship.serving.metrics import exposition

log = logging.getLogger(__name__)


V2_POST = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/(infer|predict)$")
REPOSITORY_POST = re.compile(r"^/v2/repository/models/([^/]+)/(load|unload)$")


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


def json_answer(doc: Any, status: int = 200) -> Answer:
    return status, JSON_HEADERS, pydantic_core.to_json(doc)


class HTTPSpec(compat.LitSpec):
    """The HTTP side: /, /predict, KServe v2 with its repository extension, /info and /metrics."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane  # before LitSpec's own __init__, which sets response_queue_id
        super().__init__()
        self.api_path = "/predict"
        self.settings = plane.settings
        self.catalog = plane.catalog
        # the POST routes, answered by the guard (fast_route) before FastAPI; FastAPI serves the rest
        self.routes, self.routes_generation = self.fixed_routes(), -1
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

    def fixed_routes(self) -> dict[str, tuple[Route, Route | None]]:
        return {
            "/predict": (Route(self.predict_body), None),
            "/v2/repository/index": (Route(self.repository_index), None),
        }

    @property
    def addresses(self) -> Any:
        """The workers' transport endpoints, which the server sets on the spec before the API servers fork."""
        return self.plane.addresses

    @addresses.setter
    def addresses(self, addresses: Any) -> None:
        self.plane.addresses = addresses

    @property
    def response_queue_id(self) -> int | None:
        """This API server's number, which LitServe sets on the spec: the data plane's, where its answers go."""
        return self.plane.consumer

    @response_queue_id.setter
    def response_queue_id(self, consumer: int | None) -> None:
        self.plane.consumer = consumer or 0

    # LitSpec asks for these; modelship's endpoints talk to the models through the data plane
    def decode_request(self, request: Any, context_kwargs: dict | None = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: dict | None = None) -> Any:
        return output

    # ------------------------------------------------------------------------------------------ endpoints

    @handled
    async def root(self, request: Request) -> Response:
        """What this server is and where to go next."""
        names = self.catalog.names()
        only = names[0] if len(names) == 1 else None
        return JSONResponse(
            {
                "project": "modelship",
                "version": modelship.__version__,
                "model": only,
                "models": names,
                "backend": self.settings.backend,
                "ready": self.plane.ready(),
                "links": {
                    "docs": "/docs",
                    "openapi": "/openapi.json",
                    "predict": "/predict" if only else "/v2/models/{name}/predict",
                    "v2": f"/v2/models/{only or '{name}'}",
                    "repository": "/v2/repository/index",
                    "health": "/health",
                    "info": "/info",
                    "metrics": "/metrics",
                },
            }
        )

    @handled
    async def health(self, request: Request) -> Response:
        """Readiness: 200 while this server can answer, else 503 (GET or HEAD, for load balancers and probes)."""
        ready = self.plane.ready()
        return Response("ok" if ready else "not ready", status_code=200 if ready else 503)

    async def predict_body(self, headers: dict[bytes, bytes], body: bytes) -> Answer:
        """POST /predict: the only model's newest version."""
        return await self.predict_for(self.catalog.only(), headers, body)

    async def predict_for(self, served: Served, headers: dict[bytes, bytes], body: bytes) -> Answer:
        """One image as JSON {"image" | "inputs", "top_k"?}, a multipart field `file`, or a raw image/* body."""
        model = served.model
        ctype = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower().decode("latin-1")
        if ctype == "application/json":
            req = codec.parse_predict_json(body, model)
        elif ctype.startswith("image/"):
            req = codec.PredictRequest(model.default_top_k, image=body)
        elif ctype == "multipart/form-data":
            req = await self.parse_multipart(headers, body, model)
        else:
            raise RequestError(
                f"Content-Type {ctype} is not supported; send application/json, multipart/form-data or image/*", 415
            )
        # decoding a large image takes long enough to stall every other request on this event loop
        x = req.tensor if req.tensor is not None else await asyncio.to_thread(req.to_tensor, model)
        logits = await self.plane.infer(served, x, "http")
        answer = prediction(logits[0], model.classes, req.top_k)
        return json_answer({**answer, "model_name": model.name, "model_version": served.version})

    async def parse_multipart(self, headers: dict[bytes, bytes], body: bytes,
                              model: v2.ServedModel) -> codec.PredictRequest:  # fmt: skip
        async def chunks() -> Any:
            yield body

        parser = MultiPartParser(Headers(raw=list(headers.items())), chunks(), max_files=1, max_fields=8)
        try:
            form = await parser.parse()
        except Exception as e:
            raise RequestError(f"the multipart body cannot be parsed ({e})") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError("a multipart upload needs a file field named `file`")
        top_k = codec.parse_top_k(form.get("top_k"), model)
        what = f"uploaded file {upload.filename or ''}".strip()
        return codec.PredictRequest(top_k, image=await upload.read(), what=what)

    @handled
    async def info(self, request: Request) -> Response:
        """Every model version the server holds (state, memory, the manifest's public part) and how it batches."""
        table = self.catalog.table
        held = []
        for v in sorted(table.versions.values(), key=lambda v: (v.name, v.version)):
            entry = {"name": v.name, "version": str(v.version), "state": v.state, "reason": v.reason,
                     "resident_bytes": v.resident_bytes}  # fmt: skip
            if v.state == READY:
                entry["manifest"] = self.catalog.get(v).manifest
            held.append(entry)
        names = table.names()
        only = self.catalog.resolve(names[0]).manifest if len(names) == 1 else None
        return JSONResponse({"model": only, "models": held, "server": self.server_info()})

    def server_info(self) -> dict[str, Any]:
        """How this server batches and runs, without this machine's paths and process ids."""
        settings = {k: v for k, v in asdict(self.settings).items() if k not in ("main_pid", "run_dir", "source")}
        return settings | {"serving": self.settings.source.rsplit("/", 1)[-1]}

    @handled
    async def metrics(self, request: Request) -> Response:
        body, content_type = exposition()
        return Response(body, media_type=content_type)

    @handled
    async def v2_server(self, request: Request) -> Response:
        return JSONResponse(
            {
                "name": "modelship",
                "version": modelship.__version__,
                "extensions": v2.EXTENSIONS,
            }
        )

    @handled
    async def v2_live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    @handled
    async def v2_ready(self, request: Request) -> Response:
        ready = self.plane.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @handled
    async def v2_model(self, request: Request, name: str, version: str | None = None) -> Response:
        return JSONResponse(self.catalog.metadata(name, version))

    @handled
    async def v2_model_ready(self, request: Request, name: str, version: str | None = None) -> Response:
        ready = self.plane.model_ready(name, version)
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    async def v2_body(self, name: str, version: str | None, headers: dict[bytes, bytes], body: bytes) -> Answer:
        """POST /v2/models/{name}[/versions/{v}]/infer: a batch [N, C, H, W] as JSON data or with the binary tensor
        extension."""
        served = self.catalog.resolve(name, version)
        encoding = headers.get(b"content-encoding")
        body = codec.decompress(body, encoding.decode() if encoding else None, self.settings.max_bytes)
        length = headers.get(b"inference-header-content-length")
        if length is None and len(body) > served.max_json_bytes:  # a gzip body is only measured once inflated
            raise RequestError(too_large(len(body), served.max_json_bytes, json_limit_why(served)), 413)
        req = codec.parse_v2_infer(body, length.decode() if length is not None else None, served.model)
        logits = await self.plane.infer(served, req.tensor, "http")
        content, extra = codec.v2_response(logits, req, served.model, served.version)
        return 200, [(k.encode(), v.encode()) for k, v in extra.items()], content

    async def repository_index(self, headers: dict[bytes, bytes], body: bytes) -> Answer:
        """POST /v2/repository/index: every model of the repository, each version with its state (Triton's
        repository extension); {"ready": true} lists only what is READY."""
        doc = codec.parse_json(body) if body.strip() else {}
        if not isinstance(doc, dict) or not isinstance(doc.get("ready", False), bool):
            raise RequestError('expected a JSON object, optionally {"ready": true}')
        return json_answer(self.plane.index(ready_only=bool(doc.get("ready"))))

    def fast_route(self, scope: Scope, headers: dict[bytes, bytes]) -> Route | None:
        """The POST routes, answered by the guard itself without FastAPI's routing (BENCHMARKS.md, serving):
        /predict, a model's v2 infer and predict, and the repository extension. None for everything else. A v2 JSON
        body (no binary tensor header) may be no larger than the model's largest batch written out, refused from
        its Content-Length before it is read or parsed."""
        if scope["method"] != "POST":
            return None
        path = scope["path"]
        generation = self.catalog.table.generation
        if generation != self.routes_generation:  # versions changed: limits and routes are worked out again
            self.routes, self.routes_generation = self.fixed_routes(), generation
        routes = self.routes.get(path)
        if routes is None:
            found = self.model_routes(path)
            if found is None:
                return None
            routes, lasting = found
            if lasting and len(self.routes) < 64:  # the served models' paths: a bounded few
                self.routes[path] = routes
        binary, json_body = routes
        return binary if json_body is None or b"inference-header-content-length" in headers else json_body

    def model_routes(self, path: str) -> tuple[tuple[Route, Route | None], bool] | None:
        """A per-model POST path's routes: (with binary tensors or any other body, with a v2 JSON body), and whether
        they may be kept until the model table changes (not for a model that is not served now: no limit known)."""
        m = V2_POST.match(path)
        if m is not None:
            name, version, op = m.groups()
            if op == "predict":
                return (Route(lambda h, b: self.predict_for(self.catalog.resolve(name, version), h, b)), None), True

            async def infer(headers: dict[bytes, bytes], body: bytes) -> Answer:
                return await self.v2_body(name, version, headers, body)

            try:
                served = self.catalog.resolve(name, version)
            except RequestError:
                return (Route(infer), None), False  # the handler answers why
            return (Route(infer), Route(infer, served.max_json_bytes, json_limit_why(served))), True
        m = REPOSITORY_POST.match(path)
        if m is None:
            return None
        name, op = m.groups()

        async def change(headers: dict[bytes, bytes], body: bytes) -> Answer:
            return await self.repository_change(op, name, body)

        return (Route(change), None), False

    async def repository_change(self, op: str, name: str, body: bytes) -> Answer:
        """POST /v2/repository/models/{name}/load or /unload: asked of the controller in the main process, answered
        once the change is done (loaded on every worker, or drained and unloaded) or has failed."""
        doc = codec.parse_json(body) if body.strip() else {}
        params = doc.get("parameters", {}) if isinstance(doc, dict) else None
        if not isinstance(params, dict):
            raise RequestError(f"{op} takes no model configuration or files here; send {{}} or no body")
        status, answer = await self.plane.repository_change(op, name, list(params))
        return json_answer(answer, status)


def json_limit_why(served: Served) -> str:
    c, h, w = served.model.shape
    return (
        f"limit for a v2 JSON request to this model (its largest batch, {served.model.max_batch} x {c}x{h}x{w} "
        "numbers); larger bodies are not a valid request"
    )
