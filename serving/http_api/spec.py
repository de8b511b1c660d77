"""The HTTP side of LitServe: `HTTPSpec` (endpoints, validation, responses) for every model version the server holds.

A request is parsed and validated in the API server against the version it is routed to (control.catalog); then
only a float32 array is queued, for the workers' forward passes of that version (dispatch.worker).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import asdict
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser

import modelship
from modelship.scores import prediction
from modelship.serving import compat, v2
from modelship.serving.control.catalog import Pairing, Served
from modelship.serving.control.table import READY
from modelship.serving.dataplane import CANARY_KEY, DataPlane
from modelship.serving.errors import RequestError
from modelship.serving.http_api import codec, routes
from modelship.serving.http_api.answers import Answer, handled, json_answer, too_large
from modelship.serving.http_api.guard import Fast
from modelship.serving.metrics import exposition

log = logging.getLogger(__name__)


class HTTPSpec(compat.LitSpec):
    """The HTTP side: /, /predict, KServe v2 with its repository extension, /info and /metrics."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane  # before LitSpec's own __init__, which sets response_queue_id
        super().__init__()
        self.api_path = "/predict"
        self.settings = plane.settings
        self.catalog = plane.catalog
        # the fast routes, answered by the Guard (fast_route) before FastAPI, per path until the models change; FastAPI
        # serves the rest, registered here from the route table
        self.fast: dict[tuple[str, ...], tuple[Fast, Fast | None]] = {}
        self.fast_generation = -1
        for route in routes.ROUTES:
            if route.handler is not None and not route.fast:
                self.add_endpoint(route.path, getattr(self, route.handler), list(route.methods))

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

    async def predict_body(self, params: dict[str, str], headers: dict[bytes, bytes], body: bytes) -> Answer:
        """POST /predict: the only model's newest version (under a rollout, as the rollout shares it)."""
        served = self.catalog.only()
        if self.catalog.table.rollouts:
            return await self.predict_model({"name": served.model.name}, headers, body)
        return await self.predict_for(served, headers, body)

    async def predict_model(self, params: dict[str, str], headers: dict[bytes, bytes], body: bytes) -> Answer:
        """POST /v2/models/{name}[/versions/{v}]/predict: one image, for that model (version)."""
        served, pair = self.plane.route(params["name"], params.get("version"), headers.get(CANARY_KEY))
        return await self.predict_for(served, headers, body, pair)

    async def predict_for(
        self, served: Served, headers: dict[bytes, bytes], body: bytes, pair: Pairing | None = None
    ) -> Answer:
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
        logits = await self.plane.infer(served, x, "http", pair=pair)
        answer = prediction(logits[0], model.classes, req.top_k)
        return json_answer({**answer, "model_name": model.name, "model_version": served.version})

    async def parse_multipart(
        self, headers: dict[bytes, bytes], body: bytes, model: v2.ServedModel
    ) -> codec.PredictRequest:
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
            entry = {
                "name": v.name,
                "version": str(v.version),
                "state": v.state,
                "reason": v.reason,
                "resident_bytes": v.resident_bytes,
            }
            if v.state == READY:
                entry["manifest"] = self.catalog.get(v).manifest
            held.append(entry)
        names = table.names()
        only = self.catalog.resolve(names[0]).manifest if len(names) == 1 else None
        rollouts = {name: self.plane.rollout(name) for name in sorted(table.rollouts)}
        return JSONResponse({"model": only, "models": held, "rollouts": rollouts, "server": self.server_info()})

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
    async def v2_model_config(self, request: Request, name: str, version: str | None = None) -> Response:
        return JSONResponse(self.plane.config(name, version))

    @handled
    async def v2_model_statistics(self, request: Request, name: str, version: str | None = None) -> Response:
        return JSONResponse(self.plane.statistics(name, version))

    @handled
    async def v2_model_drift(self, request: Request, name: str, version: str | None = None) -> Response:
        return JSONResponse(self.plane.drift(name, version))

    @handled
    async def v2_model_rollout(self, request: Request, name: str) -> Response:
        return JSONResponse(self.plane.rollout(name))

    @handled
    async def v2_statistics(self, request: Request) -> Response:
        return JSONResponse(self.plane.statistics())

    @handled
    async def v2_model_ready(self, request: Request, name: str, version: str | None = None) -> Response:
        ready = self.plane.model_ready(name, version)
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    async def v2_body(self, params: dict[str, str], headers: dict[bytes, bytes], body: bytes) -> Answer:
        """POST /v2/models/{name}[/versions/{v}]/infer: a batch [N, C, H, W] as JSON data or with the binary tensor
        extension."""
        served, pair = self.plane.route(params["name"], params.get("version"), headers.get(CANARY_KEY))
        encoding = headers.get(b"content-encoding")
        body = codec.decompress(body, encoding.decode() if encoding else None, self.settings.max_bytes)
        length = headers.get(b"inference-header-content-length")
        if length is None and len(body) > served.max_json_bytes:  # a gzip body is only measured once inflated
            raise RequestError(too_large(len(body), served.max_json_bytes, json_limit_why(served)), 413)
        req = codec.parse_v2_infer(body, length.decode() if length is not None else None, served.model)
        logits = await self.plane.infer(served, req.tensor, "http", req.id, pair)
        content, extra = codec.v2_response(logits, req, served.model, served.version)
        return 200, [(k.encode(), v.encode()) for k, v in extra.items()], content

    async def repository_index(self, params: dict[str, str], headers: dict[bytes, bytes], body: bytes) -> Answer:
        """POST /v2/repository/index: every model of the repository, each version with its state (Triton's
        repository extension); {"ready": true} lists only what is READY."""
        doc = codec.parse_json(body) if body.strip() else {}
        if not isinstance(doc, dict) or not isinstance(doc.get("ready", False), bool):
            raise RequestError('expected a JSON object, optionally {"ready": true}')
        return json_answer(self.plane.index(ready_only=bool(doc.get("ready"))))

    def fast_route(self, route: routes.Route, params: dict[str, str], headers: dict[bytes, bytes]) -> Fast:
        """How the Guard answers a fast route (BENCHMARKS.md, serving): its handler, and for a v2 JSON body (no binary
        tensor header) the model's largest batch written out as its size limit, refused from its Content-Length
        before it is read or parsed. Worked out once per path while the model table stays as it is."""
        generation = self.catalog.table.generation
        if generation != self.fast_generation:  # versions changed: limits are worked out again
            self.fast, self.fast_generation = {}, generation
        key = (route.path, *params.values())
        known = self.fast.get(key)
        if known is None:
            known, lasting = self.fast_for(route, params)
            if lasting and len(self.fast) < 256:  # the served models' paths: a bounded few
                self.fast[key] = known
        binary, json_body = known
        return binary if json_body is None or b"inference-header-content-length" in headers else json_body

    def fast_for(self, route: routes.Route, params: dict[str, str]) -> tuple[tuple[Fast, Fast | None], bool]:
        """(for binary tensors or any other body, for a v2 JSON body), and whether they may be kept until the model
        table changes (not for a model that is not served now: no limit is known)."""
        assert route.handler is not None
        handler = functools.partial(getattr(self, route.handler), params)
        if not route.json_limit:
            return (Fast(handler), None), True
        try:
            served = self.catalog.resolve(params["name"], params.get("version"))
        except RequestError:
            return (Fast(handler), None), False  # the handler answers why
        return (Fast(handler), Fast(handler, served.max_json_bytes, json_limit_why(served))), True

    async def repository_change(self, params: dict[str, str], headers: dict[bytes, bytes], body: bytes) -> Answer:
        """POST /v2/repository/models/{name}/load, /unload, /promote or /abort: asked of the controller in the main
        process, answered once the change is done (loaded on every worker, drained and unloaded, the rollout
        ended) or has failed."""
        op = params["op"]
        doc = codec.parse_json(body) if body.strip() else {}
        parameters = doc.get("parameters", {}) if isinstance(doc, dict) else None
        if not isinstance(parameters, dict):
            raise RequestError(f"{op} takes no model configuration or files here; send {{}} or no body")
        return json_answer(await self.plane.repository_change(op, params["name"], list(parameters)))


def json_limit_why(served: Served) -> str:
    c, h, w = served.model.shape
    return (
        f"limit for a v2 JSON request to this model (its largest batch, {served.model.max_batch} x {c}x{h}x{w} "
        "numbers); larger bodies are not a valid request"
    )
