"""The bundle's reference, measured at export through the shipped fp32 artifact on the checkpoint's validation split
(the format and the drift figures are modelship.reference's)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from modelship import reference
from modelship.backends import load_backend
from modelship.export.source import Source
from modelship.files import sha256_file, write_json
from modelship.manifest import FORMATS
from modelship.preprocess import preprocess_image
from modelship.training.data import source_samples

log = logging.getLogger(__name__)

IMAGES = 5000  # validation images the reference is measured on, evenly spread over the split


def write_reference(
    src: Source, artifacts: dict[str, dict[str, Any]], folder: Path, chunk: int
) -> dict[str, Any] | None:
    """Measure the reference on the validation split and write `folder/reference.json`; its manifest entry, or None
    (said in the log) when the validation images are not on disk: the bundle then serves without drift."""
    kind = next((k for k in FORMATS if k in artifacts), None)  # the fp32 artifact that ships: onnx first
    pairs = source_samples(src.data, "val", IMAGES) if src.data else []
    if kind is None or not pairs:
        log.info("no reference.json: the validation images are not on disk; the server will not report its drift")
        return None
    run = load_backend(kind, folder / artifacts[kind]["path"], "cpu", 1)
    x = np.stack([preprocess_image(image, src.preprocess) for image, _ in pairs])
    logits = np.concatenate([run(x[i : i + chunk]) for i in range(0, len(x), chunk)])
    sizes = np.asarray([image.size for image, _ in pairs])
    pixels = (x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3)))
    about = {"classes": list(src.classes), "artifact": kind, "source": "the checkpoint's validation split"}
    doc = reference.build(logits, np.asarray([label for _, label in pairs]), x.mean(axis=(2, 3)), pixels, sizes, about)
    path = folder / reference.FILE
    write_json(path, doc)
    return {"path": reference.FILE, "sha256": sha256_file(path), "images": len(pairs), "artifact": kind}
