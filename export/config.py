"""ExportConfig: the options of `modelship export`, validated with messages that say how to fix them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelship.errors import ConfigError
from modelship.manifest import ARTIFACT_FILES, NAME_RE

DEFAULT_OPSET = 18  # the dynamo exporter's own minimum; what Triton's and KServe's ONNX Runtime builds all read
MAX_OPSET = 23
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ExportConfig:
    """Options of `modelship export`; see README.md for each flag."""

    checkpoint: Path
    out: Path
    formats: tuple[str, ...] = ("onnx", "torchscript")
    opset: int = DEFAULT_OPSET
    max_batch: int = 64
    atol: float = 1e-4
    rtol: float = 1e-3
    force: bool = False
    name: str | None = None
    device: str = "auto"
    verbose: bool = False
    seed: int = 0
    # for a bare state_dict: how to rebuild the model and describe its input
    model: str | None = None
    model_kwargs: dict[str, Any] | None = None
    input_shape: tuple[int, int, int] | None = None
    classes: tuple[str, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in ARTIFACT_FILES]
        if not self.formats or unknown:
            raise ConfigError(
                f"--formats must name one or more of {', '.join(ARTIFACT_FILES)}, got {','.join(self.formats)!r}"
            )
        if not DEFAULT_OPSET <= self.opset <= MAX_OPSET:
            raise ConfigError(
                f"--opset must be between {DEFAULT_OPSET} and {MAX_OPSET} (the dynamo exporter's range), "
                f"got {self.opset}"
            )
        if not 1 <= self.max_batch <= 4096:
            raise ConfigError(f"--max-batch must be between 1 and 4096, got {self.max_batch}")
        if self.atol < 0 or self.rtol < 0:
            raise ConfigError(f"--atol and --rtol must be >= 0, got {self.atol} and {self.rtol}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not NAME_RE.match(self.bundle_name):
            raise ConfigError(
                f"bundle name {self.bundle_name!r} is not usable in URLs; "
                "pass --name with letters, digits, '.', '_' or '-'"
            )
        if not self.checkpoint.exists():
            raise ConfigError(f"checkpoint {self.checkpoint} does not exist")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file; expected a directory for the bundle")
        if self.out.exists() and not self.force:
            raise ConfigError(f"--out {self.out} already exists; pass --force to replace it")

    @property
    def bundle_name(self) -> str:
        if self.name is not None:
            return self.name
        return re.sub(r"[^A-Za-z0-9_.-]", "-", self.out.resolve().name).lstrip("-_.") or "model"

    @property
    def batch_sizes(self) -> list[int]:
        """1, 2, an odd size and the max batch: where batch-dimension bugs show."""
        return sorted({b for b in (1, 2, 7, self.max_batch) if b <= self.max_batch})
