"""The HTTP request and response formats: /predict (JSON, a raw image, multipart's fields) and KServe v2 over HTTP (JSON
`data` or the binary tensor extension, Content-Encoding), parsed into validated float32 arrays and written back.

Everything here runs in the API server, before a request is queued: a malformed request is answered 4xx with a
message naming what was wrong and what was expected, and never reaches a batch where it could fail the others.
Pure functions of bytes, headers and the manifest; numpy, PIL and the standard library only (and pydantic-core's
JSON parser).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydantic_core

from modelship.errors import DataError
from modelship.preprocess import ImageTooLarge, decode_image, preprocess_image
from modelship.serving.errors import RequestError
from modelship.serving.v2 import (
    CLASSIFICATION,
    ServedModel,
    bytes_tensor,
    check_classification,
    check_input,
    check_output,
    classify,
    expected_shape,
    raw_tensor,
)

MAX_IMAGE_PIXELS = 40_000_000  # a 16 MB PNG can unpack to gigabytes; refuse before decoding


def tensor_from_json(value: Any, what: str, shape: tuple[int, ...], flat_ok: bool = False) -> np.ndarray:
    """A nested (or, if `flat_ok`, flat) JSON list of numbers -> float32 array of exactly `shape`."""
    if not isinstance(value, list):
        raise RequestError(f"{what} must be a list of numbers, got {type(value).__name__}")
    try:
        arr = np.asarray(value)
    except ValueError:
        raise RequestError(f"{what} is ragged; expected a nested list of shape {list(shape)}") from None
    if arr.dtype.kind not in "iuf":
        kinds = {"b": "booleans", "U": "strings", "O": "non-numbers (null, objects or mixed types)"}
        raise RequestError(f"{what} must hold numbers only; found {kinds.get(arr.dtype.kind, arr.dtype.name)}")
    if arr.shape != shape:
        if not (flat_ok and arr.ndim == 1 and arr.size == math.prod(shape)):  # tritonclient sends flat data
            raise RequestError(f"{what} has shape {list(arr.shape)}; expected {list(shape)}")
        arr = arr.reshape(shape)
    return arr.astype(np.float32, copy=False)


def parse_json(body: bytes) -> Any:
    """pydantic-core's parser (FastAPI's own dependency): 6x faster than json.loads on tensor payloads, the
    largest cost of a JSON request (BENCHMARKS.md)."""
    if not body:
        raise RequestError("the request body is empty; expected JSON")
    try:
        return pydantic_core.from_json(body)
    except ValueError as e:
        raise RequestError(f"the request body is not valid JSON ({e})") from None


def parse_top_k(value: Any, model: ServedModel) -> int:
    if value is None:
        return model.default_top_k
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= len(model.classes):
        raise RequestError(
            f"top_k must be an integer from 1 to {len(model.classes)} (the number of classes), got {value!r}"
        )
    return value


def image_tensor(data: bytes, model: ServedModel, what: str = "image") -> np.ndarray:
    """Raw PNG/JPEG bytes -> [1, C, H, W] through the manifest's preprocessing."""
    try:
        image = decode_image(data, what, max_pixels=MAX_IMAGE_PIXELS)
        return preprocess_image(image, model.preprocess)[None]
    except ImageTooLarge as e:
        raise RequestError(str(e), 413) from None
    except DataError as e:
        raise RequestError(str(e), 400) from None


# ------------------------------------------------------------------------------------------------ /predict

PREDICT_FIELDS = ("image", "inputs", "top_k")


@dataclass
class PredictRequest:
    """A validated /predict request: a ready tensor, or image bytes still to decode (off the event loop)."""

    top_k: int
    tensor: np.ndarray | None = None  # [1, C, H, W]
    image: bytes | None = None
    what: str = "image"

    def to_tensor(self, model: ServedModel) -> np.ndarray:
        if self.tensor is not None:
            return self.tensor
        assert self.image is not None
        return image_tensor(self.image, model, self.what)


def parse_predict_json(body: bytes, model: ServedModel) -> PredictRequest:
    """{"image": base64} or {"inputs": [C,H,W]}, optional "top_k"."""
    doc = parse_json(body)
    expected = '{"image": "<base64 PNG/JPEG>"} or {"inputs": [C][H][W] floats}, optionally with "top_k"'
    if not isinstance(doc, dict):
        raise RequestError(f"expected a JSON object {expected}, got {type(doc).__name__}")
    unknown = sorted(set(doc) - set(PREDICT_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; expected {expected}")
    top_k = parse_top_k(doc.get("top_k"), model)
    if ("image" in doc) == ("inputs" in doc):
        raise RequestError(f"give exactly one of image or inputs: {expected}")
    if "image" in doc:
        if not isinstance(doc["image"], str):
            raise RequestError(f"image must be a base64 string, got {type(doc['image']).__name__}")
        text = doc["image"]
        if text.startswith("data:") and "," in text:  # data URLs from browsers
            text = text.split(",", 1)[1]
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("image is not valid base64; expected base64-encoded PNG or JPEG bytes") from None
        return PredictRequest(top_k, image=data)
    return PredictRequest(top_k, tensor=tensor_from_json(doc["inputs"], "inputs", model.shape)[None])


# ------------------------------------------------------------------------------------------------ KServe v2


@dataclass
class V2Request:
    """A validated v2 inference request: the batch, its id, and how to answer."""

    tensor: np.ndarray
    id: str | None = None
    binary_output: bool = False
    outputs: list[str] = field(default_factory=list)
    classification: int | None = None  # the classification extension's k, when the output asks for it


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo Content-Encoding gzip/deflate (tritonclient's request compression), refusing zip bombs."""
    if not encoding or encoding == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise RequestError(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none", 415)
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise RequestError(f"the {encoding} body does not decompress: {e}") from None
    if len(out) > limit:
        raise RequestError(f"the decompressed body is over the {limit // (1 << 20)} MB payload limit", 413)
    return out


V2_INPUT_FIELDS = ("name", "shape", "datatype", "parameters", "data")
V2_OUTPUT_FIELDS = ("name", "parameters")


JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


def _v2_type(value: Any, kind: type | tuple[type, ...], where: str, expected: str) -> None:
    """RequestError naming the field when a v2 request field has the wrong JSON type (a boolean is not a number)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise RequestError(f"{where} must be {expected}, got {JSON_TYPES.get(type(value), 'a number')}")


def _v2_parameters(value: Any, where: str) -> dict[str, Any]:
    """A v2 `parameters` object: string keys, string/number/boolean values (Open Inference Protocol)."""
    if value is None:
        return {}
    _v2_type(value, dict, where, "an object of string, number or boolean values")
    for key, v in value.items():
        _v2_type(v, (str, int, float, bool), f"{where}.{key}", "a string, number or boolean")
    return value


def _v2_fields(doc: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)} in {where}; it has {', '.join(allowed)}")


def parse_v2_infer(body: bytes, header_length: str | None, model: ServedModel) -> V2Request:
    """A v2 inference request, JSON or with the binary tensor extension, -> validated [N,C,H,W] float32.

    Every field is checked against the Open Inference Protocol's request schema, and named when it is wrong; an
    unknown top-level field is ignored, as Triton's and KServe's servers do (KServe's SDK sends model_name there).
    """
    doc, binary = _split_binary(body, header_length)
    if not isinstance(doc, dict):
        raise RequestError("expected a JSON object with an inputs list (KServe v2 inference request)")
    request_id = doc.get("id")
    if request_id is not None:
        _v2_type(request_id, str, "id", "a string")
    params = _v2_parameters(doc.get("parameters"), "parameters")
    inputs = doc.get("inputs")
    _v2_type(inputs, list, "inputs", f"an array with one tensor object named {model.input_name!r}")
    assert isinstance(inputs, list)
    if len(inputs) != 1:
        raise RequestError(f"inputs must be a list with one tensor object named {model.input_name!r}")
    tensor = _v2_input(inputs[0], binary, model)
    outputs = doc.get("outputs", [])
    _v2_type(outputs, list, "outputs", "an array of objects")
    binary_out = _v2_binary_flag(params, "parameters.binary_data_output")
    names, k = [], None
    for i, o in enumerate(outputs):
        where = f"outputs[{i}]"
        _v2_type(o, dict, where, "an object")
        _v2_fields(o, V2_OUTPUT_FIELDS, where)
        _v2_type(o.get("name"), str, f"{where}.name", "a string")
        check_output(o["name"], model)
        out_params = _v2_parameters(o.get("parameters"), f"{where}.parameters")
        binary_out = _v2_binary_flag(out_params, f"{where}.parameters.binary_data") or binary_out
        if CLASSIFICATION in out_params:
            k = check_classification(out_params[CLASSIFICATION], model, f"{where}.parameters.{CLASSIFICATION}")
        names.append(o["name"])
    return V2Request(tensor, request_id, binary_out, names, k)


def _split_binary(body: bytes, header_length: str | None) -> tuple[Any, bytes | memoryview]:
    """The JSON header (parsed) and the binary tensor bytes after it (the binary tensor extension), as a view of the
    body: slicing bytes would copy the tensor."""
    binary: bytes | memoryview = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise RequestError(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise RequestError(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
        body, binary = body[:n], memoryview(body)[n:]
    return parse_json(body), binary


def _v2_binary_flag(params: dict[str, Any], where: str) -> bool:
    key = where.rsplit(".", 1)[1]
    if key not in params:
        return False
    _v2_type(params[key], bool, where, "a boolean")
    return bool(params[key])


def _v2_input(t: Any, binary: bytes | memoryview, model: ServedModel) -> np.ndarray:
    """The one input tensor object -> float32 [N, C, H, W]."""
    _v2_type(t, dict, "inputs[0]", "an object")
    _v2_fields(t, V2_INPUT_FIELDS, "inputs[0]")
    _v2_type(t.get("name"), str, "inputs[0].name", "a string")
    _v2_type(t.get("datatype"), str, "inputs[0].datatype", "a string")
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise RequestError(f"inputs[0].shape must be an array of integers {expected_shape(model)}, got {shape!r}")
    check_input(t["name"], t["datatype"], shape, model)
    params = _v2_parameters(t.get("parameters"), "inputs[0].parameters")
    if "binary_data_size" not in params:
        if binary:
            raise RequestError("binary data follows the JSON header but the input has no binary_data_size parameter")
        if "data" not in t:
            raise RequestError("input needs data (a list of numbers) or binary_data_size with the binary extension")
        return tensor_from_json(t["data"], "input data", tuple(shape), flat_ok=True)
    size = params["binary_data_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size != len(binary):
        raise RequestError(f"binary input is {len(binary)} bytes but its binary_data_size is {size!r}")
    if "data" in t:
        raise RequestError("input has both binary data and a data field; send one")
    return raw_tensor(binary, shape, "binary input")


def v2_response(logits: np.ndarray, req: V2Request, model: ServedModel, version: str) -> tuple[bytes, dict[str, str]]:
    """Body and extra headers: JSON data, or the JSON header followed by the raw tensor (little-endian FP32, or with
    the classification extension BYTES rows of "score:index:label")."""
    values = classify(logits, model, req.classification) if req.classification else logits
    datatype = "BYTES" if req.classification else "FP32"
    out: dict[str, Any] = {"name": model.output_name, "datatype": datatype, "shape": list(values.shape)}
    doc: dict[str, Any] = {"model_name": model.name, "model_version": version, "outputs": [out]}
    if req.id is not None:
        doc["id"] = req.id
    if not req.binary_output:
        out["data"] = values.ravel().tolist() if req.classification else logits.astype(np.float32).ravel().tolist()
        return json.dumps(doc).encode(), {"content-type": "application/json"}
    raw = bytes_tensor(values) if req.classification else logits.astype("<f4").tobytes()
    out["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps(doc).encode()
    return header + raw, {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }
