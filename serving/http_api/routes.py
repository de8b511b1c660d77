"""The one route table of the HTTP API. Every route is declared here once, and everything else is derived from it:
which handler of the spec answers it (registered with FastAPI, or answered by the Guard in front of FastAPI for the
hot POST routes), whether it needs the API key, its metric label, and its OpenAPI operation. Adding a route is one
entry here and its handler.

A path is a template: `{name}` and `{version}` stand for one path segment each. The v2 model routes come twice,
without and with `/versions/{version}` (Triton's routes), under one metric label.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from functools import cached_property


@dataclass(frozen=True)
class Doc:
    """What the OpenAPI document says of a route: its tag and summary (`{shape}`: the example model's input), the
    request body (`predict` or `infer`), the 200 answer's schema and description (`text`: plain text), and the
    error statuses it can answer."""

    tag: str
    summary: str
    ok: str = "text"
    ok_description: str = ""
    body: str | None = None
    errors: tuple[int, ...] = ()
    unready: bool = False  # 503 with the same schema while warming up


@dataclass(frozen=True)
class Route:
    path: str
    methods: tuple[str, ...]
    handler: str | None  # the spec's method that answers it; None: FastAPI's own (/docs)
    doc: Doc | None = None  # None: not in the OpenAPI document
    open: bool = False  # no API key: health for load balancers, and the API's description (no model data)
    fast: bool = False  # answered by the Guard itself, before FastAPI's routing (BENCHMARKS.md, serving)
    json_limit: bool = False  # a v2 JSON body may be no larger than the model's largest batch written out
    params: dict[str, str] = field(default_factory=dict)  # fixed handler arguments (the repository's op)

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.path)) + "$")

    @property
    def label(self) -> str:
        """The metric label: the template, the version folded in (a bounded set, never raw paths)."""
        return self.path.replace("/versions/{version}", "")


def versioned(route: Route) -> tuple[Route, Route]:
    """A v2 model route, and the same under /versions/{version}."""
    at = route.path.index("{name}") + len("{name}")
    with_version = route.path[:at] + "/versions/{version}" + route.path[at:]
    return route, dataclasses.replace(route, path=with_version)


PREDICT_ERRORS = (400, 401, 404, 413, 415, 503, 504)
V2 = "KServe v2"

ROUTES: tuple[Route, ...] = (
    Route("/predict", ("POST",), "predict_body", fast=True, doc=Doc(
        "predict", "classify one image", "Prediction", "the best class and the top_k, with softmax scores",
        body="predict", errors=(400, 401, 413, 415, 503, 504))),
    Route("/v2", ("GET",), "v2_server", doc=Doc(V2, "server metadata", "V2ServerMetadata")),
    Route("/v2/health/live", ("GET", "HEAD"), "v2_live", open=True, doc=Doc(V2, "liveness", "V2Live")),
    Route("/v2/health/ready", ("GET", "HEAD"), "v2_ready", open=True,
          doc=Doc(V2, "readiness", "V2Ready", unready=True)),
    Route("/v2/models/stats", ("GET",), "v2_statistics", doc=Doc(  # before /v2/models/{name}, which it would match
        V2, "statistics of every ready model version (Triton's statistics extension)", "Statistics")),
    *versioned(Route("/v2/models/{name}", ("GET",), "v2_model",
                     doc=Doc(V2, "model metadata", "V2ModelMetadata", errors=(401, 404)))),
    *versioned(Route("/v2/models/{name}/ready", ("GET", "HEAD"), "v2_model_ready",
                     doc=Doc(V2, "model readiness", "V2ModelReady", errors=(401, 404), unready=True))),
    *versioned(Route("/v2/models/{name}/config", ("GET",), "v2_model_config", doc=Doc(
        V2, "the model's configuration (Triton's model configuration extension)", "ModelConfig", errors=(401, 404)))),
    *versioned(Route("/v2/models/{name}/stats", ("GET",), "v2_model_statistics", doc=Doc(
        V2, "the model's statistics (Triton's statistics extension)", "Statistics", errors=(401, 404)))),
    *versioned(Route("/v2/models/{name}/drift", ("GET",), "v2_model_drift", doc=Doc(
        V2, "live drift of the model's answers against its bundle's reference: the figures, the window, the status",
        "Drift", errors=(401, 404)))),
    Route("/v2/models/{name}/rollout", ("GET",), "v2_model_rollout", doc=Doc(
        V2, "the model's rollout (--rollout shadow|canary): its versions, share, requests so far and each check",
        "Rollout", errors=(401, 404))),
    *versioned(Route("/v2/models/{name}/infer", ("POST",), "v2_body", fast=True, json_limit=True, doc=Doc(
        V2, "inference on a batch [N, {shape}] (no version: the newest ready)", "V2InferenceResponse",
        "logits [N, classes]; binary when asked", body="infer", errors=PREDICT_ERRORS))),
    *versioned(Route("/v2/models/{name}/predict", ("POST",), "predict_model", fast=True, doc=Doc(
        "predict", "classify one image with this model", "Prediction",
        "the best class and the top_k, with softmax scores", body="predict", errors=PREDICT_ERRORS))),
    Route("/v2/repository/index", ("POST",), "repository_index", fast=True, doc=Doc(
        "model repository", "every model of the repository, each version with its state", "RepositoryIndex")),
    *(Route(f"/v2/repository/models/{{name}}/{op}", ("POST",), "repository_change", fast=True, params={"op": op},
            doc=Doc("model repository", f"{op} a model (--model-control explicit); answered once done", "",
                    "done", errors=(400, 401, 404))) for op in ("load", "unload")),
    *(Route(f"/v2/repository/models/{{name}}/{op}", ("POST",), "repository_change", fast=True, params={"op": op},
            doc=Doc("model repository", f"{what} (--rollout shadow|canary)", "RolloutOutcome",
                    "the rollout's new state and why", errors=(401, 404, 409))) for op, what in (
        ("promote", "promote the candidate of the model's rollout in progress now"),
        ("abort", "roll the candidate of the model's rollout in progress back now"))),
    Route("/", ("GET",), "root", doc=Doc("server", "what this server is, and links", "Root")),
    Route("/health", ("GET", "HEAD"), "health", open=True, doc=Doc(
        "server", "readiness: 200 while the models can answer, 503 before", "text", "ok", unready=True)),
    Route("/info", ("GET",), "info", doc=Doc(
        "server", "every model version held, with its manifest and memory, and the batching settings", "Info")),
    Route("/metrics", ("GET",), "metrics", doc=Doc(
        "server", "Prometheus metrics, summed over every server process", "text", "Prometheus text format")),
    Route("/docs", ("GET",), None, open=True),  # FastAPI's: the API's description needs no key
    Route("/docs/oauth2-redirect", ("GET",), None, open=True),
    Route("/openapi.json", ("GET",), None, open=True),
)  # fmt: skip
EXACT = {r.path: r for r in ROUTES if "{" not in r.path}


@functools.lru_cache(maxsize=4096)  # per request in the Guard: the served models' paths are a bounded few
def match(path: str) -> tuple[Route, dict[str, str]] | None:
    """The route a path belongs to (whatever the method), with its path parameters (shared: never change them);
    None for no route."""
    exact = EXACT.get(path)
    if exact is not None:
        return exact, dict(exact.params)
    for route in ROUTES:
        if "{" in route.path and (m := route.pattern.match(path)) is not None:
            return route, {**route.params, **m.groupdict()}
    return None


def label(path: str) -> str:
    """The metric label of a request's path: its route's, or `other`."""
    found = match(path)
    return found[0].label if found is not None else "other"


def is_open(path: str) -> bool:
    """The path needs no API key."""
    found = match(path)
    return found is not None and found[0].open
