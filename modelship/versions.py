"""The library versions recorded in checkpoints and manifests."""

from __future__ import annotations

import importlib.metadata
import sys

import modelship

DISTRIBUTIONS = {"onnxruntime": ("onnxruntime-gpu", "onnxruntime")}  # module -> the distributions that provide it


def versions(*modules: str) -> dict[str, str]:
    """modelship, Python and each named module's version, as plain strings (weights_only-safe): the imported
    module's `__version__` when it is loaded, else the installed distribution's, without importing it."""
    out = {"modelship": modelship.__version__, "python": sys.version.split()[0]}
    for name in modules:
        loaded = sys.modules.get(name)
        if loaded is not None and hasattr(loaded, "__version__"):
            out[name] = str(loaded.__version__)
            continue
        for dist in DISTRIBUTIONS.get(name, (name,)):
            try:
                out[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out
