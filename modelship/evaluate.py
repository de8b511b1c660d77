"""`modelship evaluate`: a bundle's artifacts over a labelled ImageFolder, with serving's preprocessing, no server.

Writes `evaluation.json` (accuracy, confusion matrix, per-class precision/recall/f1, expected calibration error,
speed, per backend, and the accuracy deltas between them), `confusion_matrix.png` and `report.html`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelship.devices import usable_gpus
from modelship.errors import ConfigError, DataError
from modelship.files import write_json
from modelship.imagefolder import check_readable, class_name, decode_each, eval_split, scan_folder
from modelship.manifest import check_bundle, require_artifact
from modelship.options import EvaluateConfig
from modelship.preprocess import Preprocess, preprocess_image
from modelship.scores import softmax

log = logging.getLogger(__name__)

ECE_BINS = 15


# ------------------------------------------------------------------------------------------------ metrics


def classification_metrics(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, the confusion matrix (rows = true class, columns = predicted, in `classes` order), per-class
    precision/recall/f1/support, and the expected calibration error of the softmax confidence (15 equal bins)."""
    k = len(classes)
    pred = logits.argmax(1)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp, predicted, support = confusion[i, i], confusion[:, i].sum(), confusion[i].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": round(float(precision), 6), "recall": round(float(recall), 6),
                           "f1": round(float(f1), 6), "support": int(support)}  # fmt: skip
    return {
        "n": len(labels),
        "accuracy": round(float((pred == labels).mean()), 6),
        "confusion_matrix": confusion.tolist(),
        "per_class": per_class,
        "ece": round(expected_calibration_error(softmax(logits), labels), 6),
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over confidence bins of |accuracy - mean confidence|, weighted by the bin's share of the images."""
    confidence, pred = probs.max(1), probs.argmax(1)
    correct = (pred == labels).astype(np.float64)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total)


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Labelled:
    """Image files with labels in the manifest's class order, and the folder they came from."""

    files: list[str]
    labels: np.ndarray
    root: Path


def labelled_folder(data: Path, classes: list[str]) -> Labelled:
    """PATH/val, else PATH/test, else PATH itself, as an ImageFolder of the manifest's classes; every file readable."""
    root = eval_split(data)
    found, samples = scan_folder(root, "--data")
    classes = [class_name(c) for c in classes]
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(
            f"--data {root} has class folders the bundle does not know: {', '.join(unknown)}; "
            f"its classes are {', '.join(classes)}"
        )
    check_readable([p for p, _ in samples], f"images in --data {root}")  # headers: decoding is done once, below
    labels = np.asarray([classes.index(found[label]) for _, label in samples], np.int64)
    return Labelled([p for p, _ in samples], labels, root)


def batches(files: list[str], pre: Preprocess, size: int, what: str) -> Iterator[np.ndarray]:
    """The files decoded and preprocessed exactly as the server does, `size` at a time. A file that does not decode
    (a truncated one) is collected, and every one is named in one DataError once all were tried, before any result
    is used."""
    arrays = decode_each(files, what, lambda image: preprocess_image(image, pre))
    while chunk := list(itertools.islice(arrays, size)):
        yield np.stack(chunk)


def progress(total: int, what: str) -> tuple[Any, Callable[[int], None]]:
    """A rich bar on a terminal (when rich is installed); otherwise a log line every tenth of the way."""
    if sys.stderr.isatty():
        try:
            from rich.progress import Progress

            bar = Progress(transient=True)
            task = bar.add_task(what, total=total)
            return bar, lambda n: bar.advance(task, n)
        except ImportError:
            pass
    done = [0]

    def advance(n: int) -> None:
        step = max(1, total // 10)
        if (done[0] + n) // step > done[0] // step:
            log.info("%s: %d/%d images", what, min(done[0] + n, total), total)
        done[0] += n

    return None, advance


# ------------------------------------------------------------------------------------------------ evaluate


@dataclass
class Evaluation:
    """What `evaluate` measured: one block per backend (the first is the reference), and where it was written."""

    results: list[dict[str, Any]]
    classes: list[str]
    data: str
    out: Path

    def to_dict(self) -> dict[str, Any]:
        """evaluation.json: the first backend's block at the top, the others with their accuracy delta."""
        first, *others = self.results
        return {"data": self.data, "classes": self.classes, **first, "comparisons": others}


def measure(
    bundle: Path,
    manifest: dict[str, Any],
    backends: tuple[str, ...],
    device: str,
    images: Iterator[np.ndarray],
    labels: np.ndarray,
) -> list[dict[str, Any]]:
    """Every backend over every batch of preprocessed images: one metrics block each, with inference time (decoding
    and preprocessing, shared by all, not counted) and the accuracy delta against the first backend."""
    from modelship.backends import load_backend

    where = "cuda:0" if usable_gpus(device) else "cpu"
    threads = os.cpu_count() or 1
    runners = {b: load_backend(b, bundle / manifest["artifacts"][b]["path"], where, threads) for b in backends}
    outputs: dict[str, list[np.ndarray]] = {b: [] for b in backends}
    seconds = dict.fromkeys(backends, 0.0)
    bar, advance = progress(len(labels), "evaluating")
    with bar or contextlib.nullcontext():
        for x in images:
            for b, run in runners.items():
                t0 = time.perf_counter()
                outputs[b].append(run(x))
                seconds[b] += time.perf_counter() - t0
            advance(len(x))
    blocks = []
    for b in backends:
        block = {"backend": b, **classification_metrics(np.concatenate(outputs[b]), labels, manifest["classes"])}
        block["seconds"] = round(seconds[b], 6)
        block["images_per_s"] = round(len(labels) / max(seconds[b], 1e-9), 1)
        blocks.append(block)
    for block in blocks[1:]:
        block["accuracy_delta"] = round(block["accuracy"] - blocks[0]["accuracy"], 6)
    return blocks


def evaluate(cfg: EvaluateConfig) -> Evaluation:
    """Run each backend over the labelled folder; write evaluation.json, confusion_matrix.png and report.html."""
    from modelship import report

    manifest = check_bundle(cfg.bundle)
    for backend in cfg.backends:
        require_artifact(manifest, cfg.bundle, backend)
    data = labelled_folder(cfg.data, manifest["classes"])
    log.info("evaluating %s on %s (%d images)", ", ".join(cfg.backends), data.root, len(data.files))
    pre = Preprocess.from_dict(manifest["preprocess"])
    images = batches(data.files, pre, cfg.batch_size, f"images in --data {data.root}")
    blocks = measure(cfg.bundle, manifest, cfg.backends, cfg.device, images, data.labels)
    result = Evaluation(blocks, list(manifest["classes"]), str(data.root), cfg.out)
    try:
        cfg.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write the evaluation to {cfg.out}: {e.strerror or e}") from None
    doc = result.to_dict()
    write_json(cfg.out / "evaluation.json", doc)
    report.confusion_png(blocks[0]["confusion_matrix"], result.classes, cfg.out / "confusion_matrix.png")
    report.write(cfg.out / "report.html", report.evaluation_page(manifest, doc, cfg.bundle))
    return result
