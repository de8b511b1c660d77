"""Triton's model configuration and statistics extensions: the documents HTTP answers as JSON and gRPC as Triton's
ModelConfig and ModelStatistics messages, in Triton's schema, so Triton's clients and tools (image_client,
perf_analyzer) read them unchanged.

The configuration is derived from the bundle's manifest and the server's own flags, never stored, so it is always
what the server does. The statistics are counted per model version in every process (serving/metrics.py) and
summed when they are read; they are never reset.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from modelship.backends import PLATFORMS
from modelship.serving.config import Settings
from modelship.serving.control.catalog import Served
from modelship.serving.metrics import PHASES, collected

# the Triton backend of each artifact kind (a pt2 program has none in Triton; pytorch is the nearest)
TRITON_BACKENDS = {"onnx": "onnxruntime", "onnx-fp16": "onnxruntime", "onnx-int8": "onnxruntime",
                   "torchscript": "pytorch", "pt2": "pytorch"}  # fmt: skip
LABELS = "labels.txt"  # the file `modelship triton` writes the classes to; the server reads them from the manifest


def model_config(served: Served, settings: Settings) -> dict[str, Any]:
    """Triton's ModelConfig of a served version, as Triton's HTTP API writes it."""
    m = served.model
    gpu = settings.device == "cuda"
    count = settings.copies // settings.devices if gpu else settings.copies  # instances on each device
    group: dict[str, Any] = {"name": m.name, "kind": "KIND_GPU" if gpu else "KIND_CPU", "count": count}
    if gpu:
        group["gpus"] = list(range(settings.devices))
    policy = {"latest": {"num_versions": 1}} if settings.version_policy == "latest" else {"all": {}}
    data_type = f"TYPE_{served.datatype}"
    return {
        "name": m.name,
        "platform": PLATFORMS[settings.backend],
        "backend": TRITON_BACKENDS[settings.backend],
        "version_policy": policy,
        "max_batch_size": m.max_batch,
        "input": [{"name": m.input_name, "data_type": data_type, "format": "FORMAT_NCHW", "dims": list(m.shape)}],
        "output": [{"name": m.output_name, "data_type": data_type, "dims": [len(m.classes)], "label_filename": LABELS}],
        "dynamic_batching": {
            "preferred_batch_size": [settings.max_batch_size],  # the batches the server forms: what is waiting, to this
            "max_queue_delay_microseconds": round(settings.batch_timeout * 1e6),
            "preserve_ordering": False,
        },
        "instance_group": [group],
        "default_model_filename": served.manifest["artifacts"][settings.backend]["path"],
    }


def duration(count: float, ns: float) -> dict[str, int]:
    return {"count": int(count), "ns": int(ns)}


def statistics(versions: list[tuple[str, str]]) -> dict[str, Any]:
    """Triton's statistics of these (model, version)s, summed over every process of the server: {"model_stats":
    [...]}, a version that has answered nothing with zeros."""
    stats: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    batches: dict[tuple[str, str], dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    last: dict[tuple[str, str], float] = {}
    for family in collected():
        for sample in family.samples:
            labels = sample.labels
            key = (labels.get("model", ""), labels.get("version", ""))
            if sample.name == "modelship_stats_total":
                stats[key][labels["stat"]] += sample.value
            elif sample.name == "modelship_batch_stats_total":
                size = batches[key][int(labels["batch_size"])]
                size[labels["stat"]] = size.get(labels["stat"], 0.0) + sample.value
            elif sample.name == "modelship_last_inference_ms":
                last[key] = max(last.get(key, 0.0), sample.value)
            elif sample.name == "modelship_inferences_total":
                stats[key]["success_count"] += sample.value
    return {"model_stats": [version_statistics(k, stats[k], batches[k], last.get(k, 0.0)) for k in versions]}


def version_statistics(
    key: tuple[str, str], s: dict[str, float], batches: dict[int, dict[str, float]], last: float
) -> dict[str, Any]:
    """One ModelStatistics entry: Triton's field names, counts and nanoseconds."""
    inference = {
        "success": duration(s["success_count"], s["success_ns"]),
        "fail": duration(s["fail_count"], s["fail_ns"]),
        "queue": duration(s["queue_count"], s["queue_ns"]),
    }
    inference |= {phase: duration(s[f"{phase}_count"], s[f"{phase}_ns"]) for phase in PHASES}
    inference |= {"cache_hit": duration(0, 0), "cache_miss": duration(0, 0)}  # modelship caches no response
    batch_stats = [
        {"batch_size": size, **{p: duration(b.get("count", 0), b.get(f"{p}_ns", 0)) for p in PHASES}}
        for size, b in sorted(batches.items())
    ]
    return {
        "name": key[0],
        "version": key[1],
        "last_inference": int(last),
        "inference_count": int(s["inference_count"]),
        "execution_count": int(s["execution_count"]),
        "inference_stats": inference,
        "batch_stats": batch_stats,
    }
