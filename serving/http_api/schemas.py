"""The request and response schemas of the HTTP API, as pydantic models: `/docs` and `/openapi.json` show them
(modelship.serving.http_api.openapi attaches them to the routes). Requests are validated by
http_api.codec, which knows each model's shape; these describe them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, RootModel

Scalar = str | int | float | bool


class Error(BaseModel):
    error: str = Field(description="what was wrong and what was expected")


class PredictImage(BaseModel):
    image: str = Field(description="a PNG or JPEG file, base64-encoded (a data: URL works too)")
    top_k: int | None = Field(None, ge=1, description="how many classes to list (default: up to 5)")


class PredictTensor(BaseModel):
    inputs: list[list[list[float]]] = Field(description="one preprocessed image, float [C][H][W]")
    top_k: int | None = Field(None, ge=1)


class Ranked(BaseModel):
    label: str
    index: int
    score: float = Field(description="softmax probability")


class Prediction(Ranked):
    top_k: list[Ranked] = Field(description="the most likely classes, best first")
    model_name: str = Field(description="the model that answered")
    model_version: str = Field(description="its version that answered")


class Root(BaseModel):
    project: str
    version: str
    model: str | None = Field(description="the model /predict answers for, when the server holds one")
    models: list[str] = Field(description="every model with a ready version")
    backend: str
    ready: bool
    links: dict[str, str]


class HeldVersion(BaseModel):
    name: str
    version: str
    state: Literal["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]
    reason: str
    resident_bytes: int = Field(description="memory its loading took, summed over the inference workers")
    manifest: dict[str, Any] | None = Field(None, description="the bundle's manifest, without this machine's paths")


class Info(BaseModel):
    model: dict[str, Any] | None = Field(description="the manifest of the only model, when there is one")
    models: list[HeldVersion] = Field(description="every model version the server holds")
    server: dict[str, Any] = Field(description="how this server batches and runs")


class RepositoryEntry(BaseModel):
    name: str
    version: str
    state: Literal["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]
    reason: str


class RepositoryIndex(RootModel[list[RepositoryEntry]]):
    pass


class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: Literal["FP32"]
    parameters: dict[str, Scalar] | None = Field(None, description="binary_data_size with the binary extension")
    data: list[float] | None = Field(None, description="row-major values, flat or nested")


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Scalar] | None = Field(None, description="binary_data: answer this output in binary")


class V2InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Scalar] | None = Field(None, description="binary_data_output: every output in binary")
    inputs: list[V2Tensor] = Field(min_length=1, max_length=1)
    outputs: list[V2RequestedOutput] | None = None


class V2InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2Tensor]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 is the batch dimension")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


MODELS: list[type[BaseModel]] = [
    Error,
    PredictImage,
    PredictTensor,
    Ranked,
    Prediction,
    Root,
    HeldVersion,
    Info,
    RepositoryEntry,
    RepositoryIndex,
    V2Tensor,
    V2RequestedOutput,
    V2InferenceRequest,
    V2InferenceResponse,
    V2TensorMetadata,
    V2ModelMetadata,
    V2ServerMetadata,
    V2Live,
    V2Ready,
    V2ModelReady,
]
