"""Scores and the `/predict` answer: softmax probabilities over a model's logits and its best classes, as the server,
`modelship predict` and the Python client give them. numpy only."""

from __future__ import annotations

from typing import Any

import numpy as np

TOP_K = 5  # classes a prediction lists when the caller does not say


def default_top_k(classes: int) -> int:
    return min(TOP_K, classes)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, in float64."""
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def prediction(logits: np.ndarray, classes: tuple[str, ...] | list[str], top_k: int) -> dict[str, Any]:
    """{"label", "index", "score", "top_k": [...]} of one image's logits, with softmax probabilities as scores."""
    p = softmax(logits)
    order = np.argsort(-p, kind="stable")[:top_k]
    ranked = [{"label": classes[i], "index": int(i), "score": float(p[i])} for i in order]
    return {**ranked[0], "top_k": ranked}
