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
RAY_FORMATS = ("parquet", "csv", "jsonl")  # --engine ray writes a folder: parquet part files, or one csv/jsonl file
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class PredictConfig:
    """Options of `modelship predict`."""

    paths: tuple[str, ...]  # files and folders; with --engine ray also listings and URIs (s3://, gs://, file://)
    url: str | None = None
    bundle: Path | None = None
    backend: str = "onnx"
    top_k: int | None = None
    batch_size: int = 64
    format: str | None = None  # tsv locally, parquet with --engine ray
    output: Path | None = None
    device: str = "auto"
    api_key: str | None = None
    timeout: float = CLIENT_TIMEOUT
    engine: str = "local"
    address: str | None = None  # --engine ray: the cluster (auto, HOST:PORT, ray://HOST:PORT); None: one for the run
    actors: int | None = None  # --engine ray: model replicas (default: as many as leave a CPU to read files)
    logits: bool = False  # --engine ray: add each row's logits
    force: bool = False  # --engine ray: replace an existing --output

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "ray":
            self._check_ray()
        else:
            for flag, given in (("--address", self.address is not None), ("--actors", self.actors is not None),
                                ("--logits", self.logits), ("--force", self.force)):  # fmt: skip
                if given:
                    raise ConfigError(f"{flag} goes with --engine ray")
        self._check_local()

    @property
    def output_format(self) -> str:
        return self.format or ("parquet" if self.engine == "ray" else "tsv")

    def _check_ray(self) -> None:
        if self.bundle is None or self.url is not None:
            raise ConfigError("--engine ray runs the bundle on the cluster: give --bundle, and no --url")
        if self.output is None:
            raise ConfigError("--engine ray writes a folder: give --output OUT")
        if self.output_format not in RAY_FORMATS:
            raise ConfigError(f"--engine ray writes {', '.join(RAY_FORMATS)}, got --format {self.format}")
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--actors must be at least 1, got {self.actors}")
        if self.output.exists() and not self.force:
            raise ConfigError(f"--output {self.output} exists; pass --force to replace it")
        if self.output.exists() and not self.output.is_dir():
            raise ConfigError(f"--output {self.output} is a file; --engine ray writes a folder")

    def _check_local(self) -> None:
        if self.url is None and self.bundle is None:
            raise ConfigError("give --url (a running server), --bundle (offline), or both (v2 inference at --url)")
        if self.url is not None and self.url.startswith("grpc://") and self.bundle is None:
            raise ConfigError(
                f"--url {self.url} needs --bundle: gRPC carries tensors, so the bundle's preprocessing runs here "
                "(or give the server's http:// URL to send it the images)"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.engine == "local" and self.output_format not in PREDICT_FORMATS:
            ray = " (parquet goes with --engine ray)" if self.format in RAY_FORMATS else ""
            raise ConfigError(f"--format must be one of {', '.join(PREDICT_FORMATS)}, got {self.format!r}{ray}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {self.top_k}")
        if self.engine == "local" and self.output is not None and self.output.is_dir():
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
