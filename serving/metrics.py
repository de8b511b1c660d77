"""Prometheus metrics shared by every server process (API servers and inference workers).

prometheus_client's multiprocess mode keeps one file per process in PROMETHEUS_MULTIPROC_DIR and sums them when
/metrics is read, so the numbers add up however many processes there are and after a worker is replaced. The
directory must be set before prometheus_client is first imported in any process: `init_dir` does that in the main
process, children inherit the variable, and the metric objects are created lazily in each process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import lru_cache
from types import SimpleNamespace

ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def init_dir() -> str:
    """A fresh directory for this server's metric files (the main process calls this first)."""
    path = tempfile.mkdtemp(prefix="modelship-metrics-")
    os.environ[ENV] = path
    return path


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


@lru_cache(maxsize=1)
def metrics() -> SimpleNamespace:
    """This process's metric objects."""
    from prometheus_client import Counter, Histogram

    return SimpleNamespace(
        requests=Counter("modelship_requests", "HTTP requests by route and status code", ["route", "status"]),
        latency=Histogram(
            "modelship_request_duration_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS
        ),
        batch_size=Histogram(
            "modelship_batch_size", "samples per model forward pass", ["model", "version"], buckets=BATCH_BUCKETS
        ),
        batch_requests=Histogram(
            "modelship_batch_requests",
            "requests per forward pass of a model version",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
        ),
        queue=Histogram(
            "modelship_queue_seconds", "time from request accepted to its batch starting", buckets=LATENCY_BUCKETS
        ),
        inference=Histogram(
            "modelship_inference_seconds",
            "model time per batch of a model version",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
        ),
        grpc_requests=Counter("modelship_grpc_requests", "gRPC calls by method and status code", ["method", "code"]),
        grpc_latency=Histogram(
            "modelship_grpc_request_duration_seconds", "gRPC call latency", ["method"], buckets=LATENCY_BUCKETS
        ),
        inferences=Counter(
            "modelship_inferences",
            "answered inference requests by model, version and protocol",
            ["model", "version", "protocol"],
        ),
    )


def exposition() -> tuple[bytes, str]:
    """The Prometheus text of all processes together."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST
