"""The library versions recorded in checkpoints and manifests."""

from __future__ import annotations

import importlib
import sys

import modelship


def versions(*modules: str) -> dict[str, str]:
    """modelship, Python and each named module's `__version__` (as a plain str: weights_only-safe)."""
    out = {"modelship": modelship.__version__, "python": sys.version.split()[0]}
    for name in modules:
        out[name] = str(importlib.import_module(name).__version__)
    return out
