"""ExportOptions and ExportConfig: the options of `modelship export`, validated with messages that say how to fix them.

ExportOptions are what `modelship run` shares with `export` (formats, tolerances, ...); ExportConfig adds the
checkpoint, the bundle folder and, for a bare state_dict, how to rebuild its model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelship.devices import DEVICES
from modelship.errors import ConfigError
from modelship.manifest import ARTIFACT_FILES, NAME_RE, safe_name

DEFAULT_OPSET = 18  # the dynamo exporter's own minimum; what Triton's and KServe's ONNX Runtime builds all read
MAX_OPSET = 23


@dataclass(frozen=True)
class ExportOptions:
    """How to export and check: formats, opset, batch sizes and tolerances; see README.md for each flag."""

    formats: tuple[str, ...] = ("onnx", "torchscript")
    opset: int = DEFAULT_OPSET
    max_batch: int = 64
    atol: float = 1e-4
    rtol: float = 1e-3
    name: str | None = None
    device: str = "auto"
    seed: int = 0

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
        if self.name is not None and not NAME_RE.match(self.name):
            raise ConfigError(
                f"--name {self.name!r} is not usable in URLs; use letters, digits, '.', '_' or '-' (at most 64)"
            )

    @property
    def batch_sizes(self) -> list[int]:
        """1, 2, an odd size and the max batch: where batch-dimension bugs show."""
        return sorted({b for b in (1, 2, 7, self.max_batch) if b <= self.max_batch})


@dataclass(frozen=True)
class ExportConfig:
    """Options of `modelship export`: what to export, where to, and how."""

    checkpoint: Path
    out: Path
    options: ExportOptions = field(default_factory=ExportOptions)
    force: bool = False
    verbose: bool = False
    # for a bare state_dict: how to rebuild the model and describe its input
    model: str | None = None
    model_kwargs: dict[str, Any] | None = None
    input_shape: tuple[int, int, int] | None = None
    classes: tuple[str, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.checkpoint.exists():
            raise ConfigError(f"checkpoint {self.checkpoint} does not exist")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file; expected a directory for the bundle")
        if self.out.exists() and not self.force:
            raise ConfigError(f"--out {self.out} already exists; pass --force to replace it")

    @property
    def bundle_name(self) -> str:
        """--name, else the bundle folder's name made URL-safe."""
        return self.options.name or safe_name(self.out.resolve().name)

    @property
    def bare(self) -> dict[str, Any]:
        """The state_dict-only options, by name."""
        return {
            "model": self.model,
            "model_kwargs": self.model_kwargs,
            "input_shape": self.input_shape,
            "classes": self.classes,
            "mean": self.mean,
            "std": self.std,
        }
