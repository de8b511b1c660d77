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
from modelship.manifest import FORMATS, NAME_RE, VARIANTS, safe_name

DEFAULT_OPSET = 18  # the dynamo exporter's own minimum; what Triton's and KServe's ONNX Runtime builds all read
MAX_OPSET = 23
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class ExportOptions:
    """How to export and check: formats, opset, batch sizes and tolerances; see README.md for each flag."""

    formats: tuple[str, ...] = ("onnx", "torchscript", "pt2")
    opset: int = DEFAULT_OPSET
    max_batch: int = 64
    atol: float = 1e-4
    rtol: float = 1e-3
    name: str | None = None
    device: str = "auto"
    seed: int = 0
    # deployment variants of the ONNX file, gated on agreement with eager and accuracy on labelled images
    variants: tuple[str, ...] = ()
    calibration_data: Path | None = None
    calibration_size: int = 256
    calibration_method: str = "minmax"
    validation_data: Path | None = None
    max_accuracy_drop: float = 0.01
    fp16_min_agreement: float = 0.99
    int8_min_agreement: float = 0.97

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if not self.formats or unknown or len(set(self.formats)) != len(self.formats):
            raise ConfigError(
                f"--formats must name one or more of {', '.join(FORMATS)}, got {','.join(self.formats)!r}"
            )
        self._check_variants()
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

    def _check_variants(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or len(set(self.variants)) != len(self.variants):
            raise ConfigError(
                f"--variants must name one or more of {', '.join(VARIANTS)}, got {','.join(self.variants)!r}"
            )
        if self.variants and "onnx" not in self.formats:
            raise ConfigError("--variants are made from the ONNX file; add onnx to --formats")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"--calibration-method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.calibration_method!r}"
            )
        if self.calibration_size < 1:
            raise ConfigError(f"--calibration-size must be at least 1, got {self.calibration_size}")
        for flag, value in (
            ("--max-accuracy-drop", self.max_accuracy_drop),
            ("--fp16-min-agreement", self.fp16_min_agreement),
            ("--int8-min-agreement", self.int8_min_agreement),
        ):
            if not 0 <= value <= 1:
                raise ConfigError(f"{flag} must be between 0 and 1, got {value}")
        for flag, path in (("--calibration-data", self.calibration_data), ("--validation-data", self.validation_data)):
            if path is not None and not path.is_dir():
                raise ConfigError(f"{flag} {path} is not a folder; expected a folder of images")

    def min_agreement(self, variant: str) -> float:
        return {"fp16": self.fp16_min_agreement, "int8": self.int8_min_agreement}[variant]

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
