"""`modelship predict`: classify image files and folders, three ways, with the same answers as the server.

- `--url URL` alone: each image is sent to a modelship server's /predict (the server preprocesses).
- `--bundle BUNDLE`: offline, no server: the bundle's preprocessing and artifact, batched.
- `--bundle BUNDLE --url URL`: the bundle's preprocessing here, then KServe v2 inference on the server (modelship,
  Triton or KServe: anything that speaks v2 and serves the bundle's model under its name).

Rows are {path, label, index, score, top_k}, written as TSV (for people), CSV or JSON lines.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from modelship.errors import DataError
from modelship.files import write_bytes
from modelship.imagefolder import check_readable, images_under, open_image
from modelship.manifest import check_bundle, require_artifact
from modelship.options import PredictConfig
from modelship.preprocess import Preprocess, preprocess_image
from modelship.scores import default_top_k, prediction


def image_files(paths: tuple[str, ...], decode: bool) -> list[str]:
    """The files given, and the visible images in the folders given (recursively); every one readable (and with
    `decode`, decodable to the end: a truncated file is found before anything is written), or DataError."""
    files: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = images_under(p)
            if not found:
                raise DataError(f"folder {p} has no images")
            files += found
        elif p.is_file():
            files.append(str(p))
        else:
            raise DataError(f"image {p} does not exist")
    check_readable(files, "images", decode=decode)
    return files


def batch_runner(cfg: PredictConfig, manifest: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """float32 [N, C, H, W] -> logits: the local artifact, or v2 inference at --url."""
    assert cfg.bundle is not None
    if cfg.url is not None:
        from modelship.grpc_client import connect

        client = connect(cfg.url, cfg.api_key, cfg.timeout)
        names = (manifest["input"]["name"], manifest["output"]["name"])
        return lambda x: client.infer(manifest["name"], x, input_name=names[0], output_name=names[1])
    artifact = require_artifact(manifest, cfg.bundle, cfg.backend)
    from modelship.backends import load_backend
    from modelship.devices import usable_gpus

    device = "cuda:0" if usable_gpus(cfg.device) else "cpu"
    return load_backend(cfg.backend, cfg.bundle / artifact["path"], device, os.cpu_count() or 1).run


def predictions(cfg: PredictConfig) -> Iterator[dict[str, Any]]:
    """One row per image, in order."""
    files = image_files(cfg.paths, decode=cfg.output is None)  # --output is written whole, once all succeeded
    if cfg.bundle is None:
        from modelship.client import Client

        assert cfg.url is not None
        client = Client(cfg.url, cfg.api_key, cfg.timeout)
        for f in files:
            yield {"path": f, **client.predict_image(f, cfg.top_k)}
        return
    manifest = check_bundle(cfg.bundle)
    classes = tuple(manifest["classes"])
    top_k = min(cfg.top_k, len(classes)) if cfg.top_k else default_top_k(len(classes))
    run = batch_runner(cfg, manifest)
    pre = Preprocess.from_dict(manifest["preprocess"])
    size = min(cfg.batch_size, int(manifest["max_batch"]))
    for i in range(0, len(files), size):
        chunk = files[i : i + size]
        logits = run(np.stack([preprocess_image(open_image(f), pre) for f in chunk]))
        for f, row in zip(chunk, logits, strict=True):
            yield {"path": f, **prediction(row, classes, top_k)}


def format_row(row: dict[str, Any], fmt: str) -> str:
    others = row["top_k"][1:]
    if fmt == "jsonl":
        return json.dumps(row) + "\n"
    if fmt == "tsv":
        rest = ", ".join(f"{t['label']} {t['score']:.3f}" for t in others)
        return f"{row['path']}\t{row['label']}\t{row['score']:.4f}" + (f"\t({rest})" if rest else "") + "\n"
    buf = io.StringIO()
    top = "|".join(f"{t['label']}:{t['score']:.6f}" for t in row["top_k"])
    csv.writer(buf, lineterminator="\n").writerow([row["path"], row["label"], row["index"], f"{row['score']:.6f}", top])
    return buf.getvalue()


def predict(cfg: PredictConfig, out: Any) -> int:
    """Write every row to `out` as it comes, or, with --output, to that file whole once all are done; the count."""
    header = "path,label,index,score,top_k\n" if cfg.output_format == "csv" else ""
    if cfg.output is None:
        out.write(header)
        n = 0
        for row in predictions(cfg):
            out.write(format_row(row, cfg.output_format))
            out.flush()
            n += 1
        return n
    text = [header, *(format_row(row, cfg.output_format) for row in predictions(cfg))]
    write_bytes(cfg.output, "".join(text).encode())
    return len(text) - 1
