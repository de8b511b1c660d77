"""The OpenAPI document behind `/docs` and `/openapi.json`: every route with its real request and response schemas.

LitSpec endpoints take a raw `Request` (bodies are parsed and validated by http_api.codec, which knows each model's
shape), so FastAPI cannot infer their bodies; the schemas are pydantic models
(modelship.serving.http_api.schemas), and `install_openapi` attaches them to the operations FastAPI lists. The
examples are built for a served model, so they work when pasted; the description lists every model version the
server holds.
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

import modelship
from modelship.errors import ModelshipError
from modelship.serving.http_api.routes import ROUTES, Route
from modelship.serving.http_api.schemas import (
    MODELS,
    Error,
    PredictImage,
    PredictTensor,
    V2InferenceRequest,
)

EXAMPLE_LIMIT = 16384  # a tensor example with more numbers than this would make /openapi.json megabytes long


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def json_body(model: type[BaseModel], description: str = "", example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": ref(model)}
    if example is not None:
        media["example"] = example
    return {"description": description or model.__name__, "content": {"application/json": media}}


def prediction_example(m: Any) -> dict[str, Any]:
    """What /predict answers, with this model's name and class names."""
    scores = [0.9, 0.06, 0.02, 0.01, 0.01][: len(m.classes)]
    ranked = [{"label": c, "index": i, "score": s} for i, (c, s) in enumerate(zip(m.classes, scores, strict=False))]
    return {**ranked[0], "top_k": ranked, "model_name": m.name, "model_version": "1"}


def errors(*codes: int) -> dict[str, Any]:
    what = {
        400: "malformed request: the message names the field and what was expected",
        401: "missing or wrong API key",
        404: "unknown model or version",
        409: "no rollout of the model in progress, or this server does not roll out (--rollout none)",
        413: "body over --max-payload-mb, or an image over 40 Mpixel",
        415: "unsupported Content-Type or Content-Encoding",
        503: "not warmed up yet, or the worker is being replaced: retry",
        504: "no answer within --timeout",
    }
    return {str(c): json_body(Error, what[c]) for c in codes}


def example_png() -> str:
    """A small grey PNG, base64: the server resizes any image to the model's size, so this works for every model."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def predict_body(shape: tuple[int, int, int]) -> dict[str, Any]:
    c, h, w = shape
    examples: dict[str, Any] = {"image": {"summary": "a base64 PNG", "value": {"image": example_png(), "top_k": 3}}}
    if c * h * w <= EXAMPLE_LIMIT:
        zeros = [[[0.0] * w for _ in range(h)] for _ in range(c)]
        examples["inputs"] = {"summary": f"a preprocessed tensor [{c}][{h}][{w}]", "value": {"inputs": zeros}}
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "required": True,
        "content": {
            "application/json": {"schema": {"oneOf": [ref(PredictImage), ref(PredictTensor)]}, "examples": examples},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}, "top_k": {"type": "integer"}},
                }
            },
            "image/png": binary,
            "image/jpeg": binary,
        },
    }


def infer_body(model_input: str, shape: tuple[int, int, int]) -> dict[str, Any]:
    n = math.prod(shape)
    tensor: dict[str, Any] = {"name": model_input, "shape": [1, *shape], "datatype": "FP32"}
    json_media: dict[str, Any] = {"schema": ref(V2InferenceRequest)}
    if n <= EXAMPLE_LIMIT:
        json_media["example"] = {"id": "example-1", "inputs": [{**tensor, "data": [0.0] * n}]}
    return {
        "required": True,
        "content": {
            "application/json": json_media,
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor extension: the JSON request (inputs[0].parameters.binary_data_size "
                "set), then the raw little-endian FP32 bytes; the header Inference-Header-Content-Length gives the "
                "JSON part's length",
            },
        },
    }


PLACEHOLDER = SimpleNamespace(
    name="{name}", classes=("class",), input_name="input", output_name="logits", shape=(3, 224, 224)
)  # (the examples' model while none is loaded)


def example_model(spec: Any) -> Any:
    """The model whose shape and classes the examples use: the first ready one, else any the table holds."""
    table = spec.catalog.table
    for v in sorted(table.versions.values(), key=lambda v: (v.state != "READY", v.name, -v.version)):
        with contextlib.suppress(ModelshipError, OSError):
            return spec.catalog.get(v).model
    return PLACEHOLDER


def describe_models(spec: Any) -> str:
    """One line per model version the server holds: its state, classes and input."""
    lines = []
    for v in sorted(spec.catalog.table.versions.values(), key=lambda v: (v.name, v.version)):
        try:
            m = spec.catalog.get(v).model
        except (ModelshipError, OSError):
            lines.append(f"- `{v.name}` version {v.version}: {v.state} {v.reason}".rstrip())
            continue
        shape = ", ".join(map(str, m.shape))
        lines.append(f"- `{v.name}` version {v.version} ({v.state}): {len(m.classes)} classes, input [N, {shape}]")
    return "\n".join(lines) or "- none loaded yet (POST /v2/repository/models/{name}/load)"


SCHEMAS = {model.__name__: model for model in MODELS}
TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}}


def operation(route: Route, m: Any) -> dict[str, Any]:
    """The OpenAPI fields modelship adds to a route's operation, from its entry in the route table; `m` is the model
    the examples are made for."""
    doc = route.doc
    assert doc is not None
    op: dict[str, Any] = {"tags": [doc.tag], "summary": doc.summary.format(shape=", ".join(map(str, m.shape)))}
    if route.open:
        op["security"] = []
    if doc.body == "predict":
        op["requestBody"] = predict_body(m.shape)
    elif doc.body == "infer":
        op["requestBody"] = infer_body(m.input_name, m.shape)
    if doc.ok == "text":
        responses = {"200": {"description": doc.ok_description or "ok", **TEXT}}
    elif not doc.ok:
        responses = {"200": {"description": doc.ok_description}}
    else:
        example = prediction_example(m) if doc.ok == "Prediction" else None
        responses = {"200": json_body(SCHEMAS[doc.ok], doc.ok_description, example)}
    if doc.unready:
        responses["503"] = (
            {"description": "not ready", **TEXT} if doc.ok == "text" else json_body(SCHEMAS[doc.ok], "warming up")
        )
    return op | {"responses": responses | errors(*doc.errors)}


def operations(spec: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """(path, method) -> the OpenAPI fields modelship adds to FastAPI's operation: every documented route of the
    table (HEAD is GET without a body: one operation)."""
    m = example_model(spec)
    documented = [(r, method.lower()) for r in ROUTES if r.doc is not None for method in r.methods if method != "HEAD"]
    return {(r.path, method): operation(r, m) for r, method in documented}


def build_openapi(app: FastAPI, spec: Any) -> dict[str, Any]:
    """FastAPI's document for the routes, completed with modelship's schemas, examples and security."""
    doc = get_openapi(
        title=title(spec),
        version=modelship.__version__,
        description=(
            f"Serves ({spec.settings.backend}):\n\n{describe_models(spec)}\n\n`/predict` classifies one image with "
            "the only model (`/v2/models/{name}/predict` with any); the KServe v2 routes take batches and speak the "
            "protocol `tritonclient` uses; a request without a version goes to the newest ready one."
        ),
        routes=app.routes,
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in MODELS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    ops = operations(spec)
    for (path, method), extra in ops.items():
        op: dict[str, Any] | None = doc["paths"].get(path, {}).get(method)
        if op is None and method == "post":  # the POST routes are answered in front of FastAPI, which never saw them
            params = [
                {"name": p.strip("{}"), "in": "path", "required": True, "schema": {"type": "string"}}
                for p in path.split("/")
                if p.startswith("{")
            ]
            op = {"operationId": operation_id(path, method), **({"parameters": params} if params else {})}
            doc["paths"].setdefault(path, {})[method] = op
        if op is not None:
            op.get("responses", {}).pop("422", None)  # FastAPI's path-parameter validation; these routes never use it
            op.update(extra if spec.settings.api_key_required else {k: v for k, v in extra.items() if k != "security"})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    for methods in doc["paths"].values():
        methods.pop("head", None)  # HEAD on the health routes is GET without a body: one operation to document
    order = list(dict.fromkeys(path for path, _ in ops))  # predict first, then v2, then the server's own routes
    doc["paths"] = {p: doc["paths"][p] for p in order if p in doc["paths"]} | doc["paths"]
    doc["tags"] = [
        {"name": "predict", "description": "one image in, its classes out"},
        {"name": "KServe v2", "description": "the Open Inference Protocol: batches of tensors, as tritonclient sends"},
        {"name": "model repository", "description": "Triton's repository extension: what is loaded, load, unload"},
        {"name": "server", "description": "what is served, health, metrics"},
    ]
    if spec.settings.api_key_required:
        doc["components"]["securitySchemes"] = {
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "bearer": {"type": "http", "scheme": "bearer"},
        }
        doc["security"] = [{"apiKey": []}, {"bearer": []}]
    return doc


def operation_id(path: str, method: str) -> str:
    """A stable operationId for an operation FastAPI did not list: infer_v2_models__name__infer_post, ..."""
    return "_".join(part.strip("{}") for part in path.split("/") if part) + f"_{method}"


def title(spec: Any) -> str:
    names = sorted({v.name for v in spec.catalog.table.versions.values()})
    return f"modelship: {', '.join(names)}" if names else "modelship"


def install_openapi(app: FastAPI, spec: Any) -> None:
    """Serve `build_openapi`'s document at /openapi.json (and so in /docs), built once on first request."""

    built = [-1]  # the table generation it was built for: versions come and go

    def openapi() -> dict[str, Any]:
        generation = spec.catalog.table.generation
        if app.openapi_schema is None or built[0] != generation:
            app.openapi_schema, built[0] = build_openapi(app, spec), generation
        return app.openapi_schema

    app.title = title(spec)  # the /docs page's title
    app.openapi = openapi  # type: ignore[method-assign]
