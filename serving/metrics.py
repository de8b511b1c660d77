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
import threading
import time
from types import SimpleNamespace
from typing import Any

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


_CREATING = threading.Lock()
_METRICS: list[SimpleNamespace] = []


def metrics() -> SimpleNamespace:
    """This process's metric objects: the traffic's, Triton's statistics', live drift's, the payload log's and the
    rollouts'. Created once under a lock: two threads asking first (an in-process server's request handler and its
    batching thread) would otherwise both register them, and prometheus_client refuses the second."""
    if not _METRICS:
        with _CREATING:
            if not _METRICS:
                _METRICS.append(
                    SimpleNamespace(
                        **traffic_metrics(), **statistics_metrics(), **monitoring_metrics(), **rollout_metrics()
                    )
                )
    return _METRICS[0]


def traffic_metrics() -> dict[str, Any]:
    from prometheus_client import Counter, Histogram

    return dict(
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


def statistics_metrics() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge

    return dict(
        # Triton's statistics extension (serving/extensions.py reads them back): counts and nanoseconds
        stats=Counter(
            "modelship_stats",
            "Triton's model statistics by model version: inference and execution counts, and count and ns of "
            "success, fail, queue and compute_input/infer/output",
            ["model", "version", "stat"],
        ),
        batch_stats=Counter(
            "modelship_batch_stats",
            "Triton's batch statistics: executions and their compute_input/infer/output ns by batch size",
            ["model", "version", "batch_size", "stat"],
        ),
        last_inference=Gauge(
            "modelship_last_inference_ms",
            "when a model version last ran a batch (milliseconds since the epoch)",
            ["model", "version"],
            multiprocess_mode="max",
        ),
    )


def latest(name: str, text: str, labels: tuple[str, ...] = ("model", "version")) -> Any:
    """A gauge only the main process sets, by model version: the most recent value counts."""
    from prometheus_client import Gauge

    return Gauge(name, text, list(labels), multiprocess_mode="mostrecent")


def monitoring_metrics() -> dict[str, Any]:
    from prometheus_client import Counter

    return dict(
        # live drift (serving/monitoring/drift.py), set by the main process only: the most recent value counts
        drift_status=latest("modelship_drift_status", "0 ok, 1 warn, 2 drift; -1 collecting, -2 no reference"),
        drift_psi=latest("modelship_drift_psi", "PSI of the window's predicted classes against the reference's"),
        drift_confidence=latest("modelship_drift_mean_confidence", "the window's mean top-1 confidence"),
        drift_low_confidence=latest(
            "modelship_drift_low_confidence_share",
            "the window's share of answers under the reference's 5th-percentile confidence",
        ),
        drift_shift=latest(
            "modelship_drift_channel_shift",
            "an input channel's mean shift, in the reference's standard deviations of image means",
            ("model", "version", "channel"),
        ),
        drift_answers=latest("modelship_drift_window_answers", "answers in the drift window"),
        payloads_dropped=Counter(
            "modelship_payload_log_dropped", "payload log records dropped (queue full, sink down)", ["reason"]
        ),
        payloads_written=Counter("modelship_payload_log_written", "payload log records written or sent"),
    )


def rollout_metrics() -> dict[str, Any]:
    """Set by the main process's controller at each look at a rollout (control/rollout.py)."""
    by_role = ("model", "version", "role")
    return dict(
        rollout_state=latest(
            "modelship_rollout_state", "a candidate's rollout: 0 running, 1 promoted, -1 rolled back, -2 stopped"
        ),
        rollout_compared=latest("modelship_rollout_compared", "requests both versions of the rollout ran"),
        rollout_dropped=latest("modelship_rollout_dropped", "copies an overloaded server did not run"),
        rollout_agreement=latest(
            "modelship_rollout_agreement", "the candidate's top-1 agreement with the serving version"
        ),
        rollout_requests=latest(
            "modelship_rollout_requests", "the rollout's requests each version ran, by role", by_role
        ),
        rollout_errors=latest(
            "modelship_rollout_errors", "the rollout's requests each version failed, by role", by_role
        ),
        rollout_p99=latest(
            "modelship_rollout_service_p99_seconds",
            "each version's p99 service time (its workers' time per batch) over the rollout, by role",
            by_role,
        ),
    )


def exposition() -> tuple[bytes, str]:
    """The Prometheus text of all processes together."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def collected() -> Any:
    """Every metric family of all processes together (for the statistics extension)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry.collect()


PHASES = ("compute_input", "compute_infer", "compute_output")  # Triton's names for the parts of an execution


class VersionStats:
    """One model version's statistics counters in this process (Triton's statistics extension), their labelled
    children looked up once: `labels()` takes a lock a call."""

    def __init__(self, name: str, version: str) -> None:
        m = metrics()
        self.name, self.version = name, version
        self.counters: dict[str, Any] = {}
        self.batches: dict[tuple[int, str], Any] = {}
        self.last = m.last_inference.labels(name, version)

    def add(self, stat: str, value: float) -> None:
        counter = self.counters.get(stat)
        if counter is None:
            counter = self.counters[stat] = metrics().stats.labels(self.name, self.version, stat)
        counter.inc(value)

    def batch(self, size: int, stat: str, value: float) -> None:
        counter = self.batches.get((size, stat))
        if counter is None:
            counter = self.batches[(size, stat)] = metrics().batch_stats.labels(
                self.name, self.version, str(size), stat
            )
        counter.inc(value)

    def execution(
        self, requests: int, queue_ns: int, input_ns: int, chunks: list[tuple[int, int]], output_ns: int
    ) -> None:
        """One batch of `requests`, queued `queue_ns` in all, its input gathered in `input_ns`, run as executions of
        (rows, ns) `chunks`, its answers split in `output_ns`. Each request is charged its batch's phases, as Triton
        counts them; an execution, its own compute and its rows' share of the gathering and splitting."""
        samples = sum(rows for rows, _ in chunks)
        phases = (input_ns, sum(ns for _, ns in chunks), output_ns)
        self.add("inference_count", samples)
        self.add("execution_count", len(chunks))
        self.add("queue_count", requests)
        self.add("queue_ns", queue_ns)
        for phase, ns in zip(PHASES, phases, strict=True):
            self.add(f"{phase}_count", requests)
            self.add(f"{phase}_ns", requests * ns)
        for rows, ns in chunks:
            self.batch(rows, "count", 1)
            self.batch(rows, "compute_input_ns", input_ns * rows // samples)
            self.batch(rows, "compute_infer_ns", ns)
            self.batch(rows, "compute_output_ns", output_ns * rows // samples)
        self.last.set(time.time() * 1000)
