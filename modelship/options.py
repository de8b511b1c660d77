"""The options of the tools, `modelship predict`, `evaluate` and `monitor`, validated with messages that say how to fix
them; where the client looks by default; and the drift thresholds `serve` and `monitor` share. Light on purpose
(standard library only): the CLI reads its defaults from here for `--help`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from modelship.devices import DEVICES
from modelship.errors import ConfigError
from modelship.manifest import BACKENDS

CLIENT_URL = "http://127.0.0.1:8000"  # where `modelship predict --url` and Client() look by default
CLIENT_TIMEOUT = 30.0


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of `modelship evaluate`."""

    bundle: Path
    data: Path
    backends: tuple[str, ...] = ("onnx",)
    out: Path = Path("evaluation")
    batch_size: int = 64
    device: str = "auto"

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if not self.backends or unknown or len(set(self.backends)) != len(self.backends):
            raise ConfigError(
                f"--backend must name one or more of {', '.join(BACKENDS)}, got {', '.join(self.backends)}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file; expected a folder for the evaluation")


PREDICT_FORMATS = ("tsv", "csv", "jsonl")


@dataclass(frozen=True)
class PredictConfig:
    """Options of `modelship predict`."""

    paths: tuple[Path, ...]
    url: str | None = None
    bundle: Path | None = None
    backend: str = "onnx"
    top_k: int | None = None
    batch_size: int = 64
    format: str = "tsv"
    output: Path | None = None
    device: str = "auto"
    api_key: str | None = None
    timeout: float = CLIENT_TIMEOUT

    def __post_init__(self) -> None:
        if self.url is None and self.bundle is None:
            raise ConfigError("give --url (a running server), --bundle (offline), or both (v2 inference at --url)")
        if self.url is not None and self.url.startswith("grpc://") and self.bundle is None:
            raise ConfigError(
                f"--url {self.url} needs --bundle: gRPC carries tensors, so the bundle's preprocessing runs here "
                "(or give the server's http:// URL to send it the images)"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.format not in PREDICT_FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(PREDICT_FORMATS)}, got {self.format!r}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {self.top_k}")
        if self.output is not None and self.output.is_dir():
            raise ConfigError(f"--output {self.output} is a folder; expected a file to write")


@dataclass(frozen=True)
class Thresholds:
    """Where a figure turns a version's status to `warn`, and to `drift` (serve's and monitor's --drift-* flags).
    The defaults sit at twice and more what windows of 1000 in-distribution answers reached (99th percentile: PSI
    0.008, low-confidence share 0.04, shift 0.13 sd), and below what brightening by 25-50 levels, grayscale, one
    class only or another kind of image reached (benchmarks/drift_bench.py; BENCHMARKS.md, monitoring)."""

    psi: tuple[float, float] = (0.1, 0.25)  # the usual lines of a moderate and a large population shift
    low_confidence: tuple[float, float] = (0.1, 0.2)  # the reference's own share is 0.05 by definition
    shift: tuple[float, float] = (0.25, 0.5)

    def __post_init__(self) -> None:
        for name, (warn, drift) in asdict(self).items():
            if not 0 < warn < drift:
                flag = f"--drift-{name.replace('_', '-')}"
                raise ConfigError(f"{flag} must be WARN,DRIFT with 0 < WARN < DRIFT, got {warn:g},{drift:g}")
        if self.low_confidence[1] > 1:
            raise ConfigError(
                f"--drift-low-confidence is a share of answers, at most 1, got {self.low_confidence[1]:g}"
            )


@dataclass(frozen=True)
class MonitorConfig:
    """Options of `modelship monitor`."""

    logs: Path  # a payload log folder (--log-payloads), or one of its files
    bundle: Path
    out: Path = Path("monitor")
    window: int = 1000  # answers of the last window the status is judged on, as the server's --drift-window
    periods: int = 24  # the log's time cut into this many periods for the figures over time
    thresholds: Thresholds = Thresholds()

    def __post_init__(self) -> None:
        if not self.logs.exists():
            raise ConfigError(f"LOGS {self.logs} does not exist; expected the folder serve --log-payloads wrote")
        if self.window < 1:
            raise ConfigError(f"--window must be at least 1, got {self.window}")
        if not 1 <= self.periods <= 1000:
            raise ConfigError(f"--periods must be 1 to 1000, got {self.periods}")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file; expected a folder for the report")
