"""The KServe v2 (Open Inference) protocol's rules that HTTP and gRPC share: the model a request is checked against
(ServedModel, from the manifest), the checks of an input and an output tensor with their messages (one rule, one
message, every protocol), raw FP32 bytes as an array, and the extensions the server lists. numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelship.preprocess import Preprocess
from modelship.scores import default_top_k
from modelship.serving.errors import RequestError

DTYPES = {"FP32": np.dtype("<f4")}
# what the server metadata lists, over HTTP and gRPC: exactly the extensions served
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository", "statistics"]
CLASSIFICATION = "classification"  # an output parameter: answer the top k classes as BYTES "score:index:label"


@dataclass(frozen=True)
class ServedModel:
    """What request validation needs from the manifest."""

    name: str
    classes: tuple[str, ...]
    input_name: str
    output_name: str
    shape: tuple[int, int, int]  # C, H, W
    preprocess: Preprocess
    max_batch: int

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], max_batch: int) -> ServedModel:
        c, h, w = (int(v) for v in manifest["input"]["shape"][1:])
        return cls(
            name=manifest["name"],
            classes=tuple(manifest["classes"]),
            input_name=manifest["input"]["name"],
            output_name=manifest["output"]["name"],
            shape=(c, h, w),
            preprocess=Preprocess.from_dict(manifest["preprocess"]),
            max_batch=max_batch,
        )

    @property
    def default_top_k(self) -> int:
        return default_top_k(len(self.classes))


def expected_shape(model: ServedModel) -> str:
    return f"[N, {', '.join(map(str, model.shape))}]"


def check_input(name: str, datatype: str, shape: list[int], model: ServedModel) -> None:
    """The checks every v2 input tensor passes, over HTTP or gRPC, with the same messages."""
    if name != model.input_name:
        raise RequestError(f"unknown input {name!r}; this model's input is {model.input_name!r}")
    if datatype not in DTYPES:
        raise RequestError(f"input datatype {datatype!r} is not supported; expected FP32")
    if len(shape) != 4 or tuple(shape[1:]) != model.shape or shape[0] < 1:
        raise RequestError(f"input shape {shape} does not fit the model; expected {expected_shape(model)}")
    if shape[0] > model.max_batch:
        raise RequestError(f"input batch of {shape[0]} is over this server's limit of {model.max_batch}")


def check_output(name: str, model: ServedModel) -> None:
    if name != model.output_name:
        raise RequestError(f"unknown output {name!r}; this model's output is {model.output_name!r}")


def raw_tensor(data: bytes | memoryview, shape: list[int], what: str) -> np.ndarray:
    """Raw little-endian FP32 bytes of a checked shape -> the array, a view of the bytes (no copy)."""
    need = math.prod(shape) * 4
    if len(data) != need:
        raise RequestError(f"{what} is {len(data)} bytes; shape {shape} FP32 needs {need} bytes")
    return np.frombuffer(data, dtype=DTYPES["FP32"]).reshape(shape)


def check_classification(k: Any, model: ServedModel, where: str) -> int:
    """The classification extension's k, as a request gives it: a whole number from 1 to the class count."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(model.classes):
        raise RequestError(
            f"{where} must be an integer from 1 to {len(model.classes)} (the number of classes), got {k!r}"
        )
    return k


def classify(logits: np.ndarray, model: ServedModel, k: int) -> np.ndarray:
    """Triton's classification extension: for each row of logits, its k highest as "score:index:label" (the
    output's own values, as Triton gives them: no softmax), highest first, ties by index; an object array [N, k]."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    rows = [[f"{row[i]:f}:{i}:{model.classes[i]}" for i in top] for row, top in zip(logits, order, strict=True)]
    return np.asarray(rows, dtype=object).reshape(len(rows), k)


def bytes_tensor(values: np.ndarray) -> bytes:
    """A BYTES tensor as the binary tensor extension and gRPC's raw contents carry it: each element, in row-major
    order, as its length (4 bytes, little-endian) and its UTF-8 bytes."""
    out = bytearray()
    for v in values.ravel():
        data = v.encode() if isinstance(v, str) else bytes(v)
        out += len(data).to_bytes(4, "little") + data
    return bytes(out)
