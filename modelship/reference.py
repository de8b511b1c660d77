"""A bundle's reference (`reference.json`): what the shipped model saw and answered on its validation split, and the
drift figures of other answers against it.

Export writes it (through the shipped fp32 artifact, on the checkpoint's validation split): the label and
predicted-class distributions, the top-1 confidence histogram and its quantiles, the per-channel mean and standard
deviation of the preprocessed input (over pixels, and over images of their per-image means), and the raw images'
size and aspect quantiles. The server compares a sliding window of live answers with it, and `modelship monitor`
logged payloads; both through `figures` and `judge` here, so the two agree to the last digit. numpy only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from modelship.errors import BundleError
from modelship.options import Thresholds
from modelship.scores import softmax

FILE = "reference.json"
FORMAT = "modelship.reference"
VERSION = 1
BINS = 20  # the confidence histogram's bins over [0, 1]
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
EPSILON = 1e-4  # the share a class never seen counts as in PSI (ln 0 is not a number)
LOW_QUANTILE = "0.05"  # an answer below the reference's 5th-percentile confidence is a low-confidence one


def top1(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, its softmax probability) of each row of logits."""
    p = softmax(logits)
    pred = p.argmax(axis=1)
    return pred, p[np.arange(len(p)), pred]


def quantiles(values: np.ndarray) -> dict[str, float]:
    return {f"{q:g}": float(np.quantile(values, q)) for q in QUANTILES} if len(values) else {}


def build(
    logits: np.ndarray,
    labels: np.ndarray,
    means: np.ndarray,
    pixels: tuple[np.ndarray, np.ndarray],
    sizes: np.ndarray,
    about: dict[str, Any],
) -> dict[str, Any]:
    """reference.json's document. `logits` [n, K] of the shipped artifact on `n` validation images, their `labels`,
    each image's per-channel input `means` [n, C], the per-channel (mean, std) of every input pixel, the raw
    `sizes` [n, 2] (width, height); `about`: the classes, the artifact and where the images came from."""
    k = len(about["classes"])
    pred, conf = top1(logits)
    counts = np.bincount(pred, minlength=k)
    label_counts = np.bincount(labels, minlength=k)
    histogram, _ = np.histogram(conf, bins=BINS, range=(0.0, 1.0))
    return {
        "format": FORMAT,
        "version": VERSION,
        **about,
        "images": len(pred),
        "labels": {"counts": label_counts.tolist(), "share": (label_counts / len(pred)).tolist()},
        "predicted": {"counts": counts.tolist(), "share": (counts / len(pred)).tolist()},
        "confidence": {
            "bins": BINS,
            "counts": histogram.tolist(),
            "mean": float(conf.mean()),
            "quantiles": quantiles(conf),
        },
        "input": {
            "channel_mean": pixels[0].tolist(),
            "channel_std": pixels[1].tolist(),
            "image_mean_std": means.std(axis=0).tolist(),  # how far one image's channel mean strays from another's
        },
        "raw": {
            "width": quantiles(sizes[:, 0].astype(float)),
            "height": quantiles(sizes[:, 1].astype(float)),
            "aspect": quantiles(sizes[:, 0] / np.maximum(sizes[:, 1], 1)),
        },
    }


def read(bundle: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The bundle's reference, checked against its manifest (the classes, the input's channels); None for a bundle
    that has none (exported before references, or with no validation images on disk): it serves, without drift."""
    entry = manifest.get("reference")
    if not entry:
        return None
    path = bundle / entry["path"]
    try:
        ref = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} cannot be read as a reference ({e}); re-export the bundle") from None
    if not isinstance(ref, dict) or ref.get("format") != FORMAT or ref.get("version") != VERSION:
        raise BundleError(f"{path} is not a modelship reference of version {VERSION}; re-export the bundle")
    channels = int(manifest["input"]["shape"][1])
    if ref.get("classes") != manifest["classes"] or len(ref["input"]["channel_mean"]) != channels:
        raise BundleError(
            f"{path} does not match its bundle (its classes or input channels differ from the manifest's); "
            "it was not written with this bundle: re-export"
        )
    return ref


def psi(expected: np.ndarray, counts: np.ndarray) -> float:
    """The population stability index of observed class `counts` against `expected` shares (both smoothed by
    EPSILON): 0 for the same distribution; 0.1 and 0.25 are the usual lines for a moderate and a large shift."""
    e = np.clip(np.asarray(expected, np.float64), EPSILON, None)
    a = np.clip(counts / max(1, counts.sum()), EPSILON, None)
    return float(((a - e) * np.log(a / e)).sum())


def figures(ref: dict[str, Any], pred: np.ndarray, conf: np.ndarray, means: np.ndarray) -> dict[str, Any]:
    """The drift figures of answers (predicted classes, top-1 confidences, per-image channel means [n, C]) against
    the reference: PSI of the predicted classes, the mean confidence and the share under the reference's 5th
    percentile, and each channel's mean shift in units of the reference's spread of image means."""
    k = len(ref["classes"])
    low = ref["confidence"]["quantiles"][LOW_QUANTILE]
    spread = np.maximum(np.asarray(ref["input"]["image_mean_std"]), 1e-12)
    shift = np.abs(means.mean(axis=0) - np.asarray(ref["input"]["channel_mean"])) / spread if len(means) else None
    counts = np.bincount(pred, minlength=k)
    return {
        "answers": len(pred),
        "psi": psi(np.asarray(ref["predicted"]["share"]), counts) if len(pred) else 0.0,
        "predicted_share": (counts / max(1, len(pred))).tolist(),
        "mean_confidence": float(conf.mean()) if len(conf) else 0.0,
        "reference_mean_confidence": ref["confidence"]["mean"],
        "low_confidence_share": float((conf < low).mean()) if len(conf) else 0.0,
        "reference_low_confidence_share": 0.05,
        "channel_shift": shift.tolist() if shift is not None else [],
    }


def judge(fig: dict[str, Any], thresholds: Thresholds) -> tuple[str, list[str]]:
    """(ok | warn | drift, the reasons in numbers) of a version's figures."""
    checks = [
        ("psi", fig["psi"], "PSI of the predicted classes"),
        ("low_confidence", fig["low_confidence_share"], "share of answers under the reference's 5% confidence"),
        ("shift", max(fig["channel_shift"], default=0.0), "largest input channel shift (reference image-mean sds)"),
    ]
    status, reasons = "ok", []
    for name, value, what in checks:
        warn, drift = getattr(thresholds, name)
        if value >= drift:
            status = "drift"
            reasons.append(f"{what} {value:.3f} >= {drift:g}")
        elif value >= warn:
            status = "drift" if status == "drift" else "warn"
            reasons.append(f"{what} {value:.3f} >= {warn:g}")
    return status, reasons
