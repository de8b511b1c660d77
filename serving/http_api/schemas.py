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
    rollouts: dict[str, dict[str, Any]] = Field(description="each model's rollout, as GET /v2/models/{name}/rollout")
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
    datatype: Literal["FP32", "BYTES"] = Field(description="BYTES: the classification extension's rows")
    parameters: dict[str, Scalar] | None = Field(None, description="binary_data_size with the binary extension")
    data: list[float] | list[str] | None = Field(
        None, description='row-major values, flat or nested; with classification, "score:index:label" strings'
    )


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Scalar] | None = Field(
        None,
        description="binary_data: answer this output in binary; classification: k, answer the k best classes as "
        'BYTES "score:index:label" (Triton\'s classification extension)',
    )


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


class ModelConfig(BaseModel):
    """Triton's model configuration (model_config.proto), as Triton's HTTP API writes it."""

    name: str
    platform: str
    backend: str
    version_policy: dict[str, Any]
    max_batch_size: int = Field(description="the largest batch a request may carry")
    input: list[dict[str, Any]] = Field(description="name, data_type, format (FORMAT_NCHW), dims without the batch")
    output: list[dict[str, Any]] = Field(description="name, data_type, dims, label_filename")
    dynamic_batching: dict[str, Any]
    instance_group: list[dict[str, Any]]
    default_model_filename: str


class Duration(BaseModel):
    count: int
    ns: int


class ModelStatistics(BaseModel):
    """Triton's statistics of one model version."""

    name: str
    version: str
    last_inference: int = Field(description="milliseconds since the epoch; 0 before the first")
    inference_count: int = Field(description="samples inferred")
    execution_count: int = Field(description="model executions (batches)")
    inference_stats: dict[str, Duration] = Field(
        description="success, fail, queue, compute_input, compute_infer, compute_output, cache_hit, cache_miss"
    )
    batch_stats: list[dict[str, Any]] = Field(
        description="per batch size: compute_input, compute_infer, compute_output"
    )


class Drift(BaseModel):
    """Live drift of a model version against its bundle's reference."""

    model: str
    version: str
    status: Literal["ok", "warn", "drift", "collecting", "no_reference", "off"]
    reasons: list[str] = Field(description="each threshold crossed, in numbers")
    window: dict[str, int] | None = Field(None, description="size: answers measured over; answers: held now")
    figures: dict[str, Any] | None = Field(
        None, description="psi, mean_confidence, low_confidence_share, channel_shift, and the reference's"
    )
    thresholds: dict[str, list[float]] | None = Field(None, description="WARN and DRIFT of each figure")
    time: float | None = Field(None, description="when the main process last looked (seconds since the epoch)")


class Rollout(BaseModel):
    """A model's rollout: the controller's last look at the one in progress, or how the last one ended."""

    model: str
    mode: Literal["none", "shadow", "canary"]
    state: Literal["off", "none", "running", "promoted", "rolled_back", "stopped"]
    reason: str = Field(description="how it ended, in numbers (or why it waits for a hand, or why there is none)")
    serving: str | None = Field(None, description="the version that serves")
    candidate: str | None = Field(None, description="the version rolled out")
    share: float | None = Field(None, description="shadow: the share of requests copied; canary: the share answered")
    target: int | None = Field(None, description="compared requests that end it (--rollout-requests)")
    blocked: bool | None = Field(None, description="the versions cannot be compared: promote or abort by hand")
    started: float | None = None
    ended: float | None = None
    seconds: float | None = Field(None, description="from its start to its end (or to now)")
    requests: dict[str, Any] | None = Field(
        None, description="compared (requests both versions ran), dropped (copies an overloaded server did not run), "
        "serving and candidate (of the compared, as each version ran them), routed (requests without a version while "
        "it ran), candidate_share (canary: candidate / routed), errors by version"
    )  # fmt: skip
    checks: dict[str, dict[str, Any]] | None = Field(
        None, description="agreement, errors, latency, drift: value, limit, serving's, passed (null: no evidence yet)"
    )


class RolloutOutcome(BaseModel):
    model: str
    state: Literal["promoted", "rolled_back"]
    reason: str


class Statistics(BaseModel):
    model_stats: list[ModelStatistics]


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
    ModelConfig,
    Duration,
    ModelStatistics,
    Statistics,
    Drift,
    Rollout,
    RolloutOutcome,
]
