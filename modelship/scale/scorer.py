"""The Ray Data actor: the bundle's artifact, and a batch of files in, local predict's rows out."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from modelship.errors import BundleError, DataError
from modelship.imagefolder import MAX_PIXELS
from modelship.scale.sources import URI


class Scorer:
    """A Ray Data actor: the bundle's artifact, loaded once from the bytes the driver checked, and `__call__` on a
    batch of rows {path, location} -> {row (JSON of local predict's row), error}."""

    def __init__(self, manifest: dict[str, Any], backend: str, artifact: list[Any], device: str, threads: int,
                 top_k: int, logits: bool) -> None:  # fmt: skip
        import hashlib

        import ray

        from modelship.backends import load_backend
        from modelship.preprocess import Preprocess

        data = ray.get(artifact[0])
        entry = manifest["artifacts"][backend]
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise BundleError(f"artifact {entry['path']} arrived with another sha256 than the bundle's manifest")
        with tempfile.TemporaryDirectory() as tmp:  # the runtimes load from a file, then hold the model in memory
            path = Path(tmp) / Path(entry["path"]).name
            path.write_bytes(data)
            self.run = load_backend(backend, path, device, min(threads, os.cpu_count() or 1)).run
        self.pre = Preprocess.from_dict(manifest["preprocess"])
        self.classes, self.chunk = tuple(manifest["classes"]), int(manifest["max_batch"])
        self.top_k, self.logits = top_k, logits
        self.filesystems: dict[tuple[str, str], Any] = {}

    def read(self, location: str) -> bytes:
        if not URI.match(location):
            return Path(location).read_bytes()
        from pyarrow import fs as pafs

        parts = urlsplit(location)
        key = (parts.scheme, parts.netloc)
        if key not in self.filesystems:
            self.filesystems[key] = pafs.FileSystem.from_uri(location)[0]
        path = parts.path if parts.scheme == "file" else parts.netloc + parts.path
        with self.filesystems[key].open_input_stream(path) as f:
            return bytes(f.read())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from modelship.preprocess import decode_image, preprocess_image
        from modelship.scores import prediction

        paths = [str(p) for p in batch["path"]]
        errors = [""] * len(paths)
        arrays, good = [], []
        for i, location in enumerate(batch["location"]):
            try:
                image = decode_image(self.read(str(location)), f"image {paths[i]}", MAX_PIXELS)
                arrays.append(preprocess_image(image, self.pre))
                good.append(i)
            except (DataError, OSError, ValueError) as e:
                errors[i] = str(e) if isinstance(e, DataError) else f"cannot read image {paths[i]}: {e}"
        rows = [""] * len(paths)
        if arrays:
            x = np.stack(arrays)
            logits = np.concatenate([self.run(x[i : i + self.chunk]) for i in range(0, len(x), self.chunk)])
            for i, row in zip(good, logits, strict=True):
                out = {"path": paths[i], **prediction(row, self.classes, self.top_k)}
                if self.logits:
                    out["logits"] = [float(v) for v in row]
                rows[i] = json.dumps(out)
        return {"row": np.asarray(rows, dtype=object), "error": np.asarray(errors, dtype=object),
                "path": np.asarray(paths, dtype=object)}  # fmt: skip
