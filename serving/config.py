"""The options of `modelship serve` (ServeConfig), validated with messages that say how to fix them, and the settings
derived from them that the API servers and workers read (Settings).

Light on purpose (standard library only): the CLI reads its defaults from here for `--help`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from modelship.devices import DEVICES
from modelship.errors import ConfigError
from modelship.manifest import BACKENDS
from modelship.options import Thresholds
from modelship.serving.control.evidence import Policy

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds
MODEL_CONTROL = ("none", "explicit", "poll")  # Triton's --model-control-mode values
VERSION_POLICIES = ("latest", "all")
ROLLOUTS = ("none", "shadow", "canary")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServeConfig:
    """Options of `modelship serve`; see README.md for each flag and BENCHMARKS.md for how defaults were chosen."""

    bundle: Path  # a bundle, or a model repository REPO/<name>/<version>/ of them
    backend: str = "onnx"
    model_control: str = "none"  # Triton's modes: none | explicit | poll
    load_models: tuple[str, ...] = ()  # --load-model, with explicit control ("*": every model)
    poll_interval: float = 5.0
    version_policy: str = "latest"  # latest | all
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int | None = None  # also serve KServe v2 over gRPC here (serving/grpc_service.py)
    max_batch_size: int = 32
    batch_timeout: float = 0.0  # take what is waiting: under load batches fill while the model runs (BENCHMARKS.md)
    workers_per_device: int = 2
    in_process: bool = False  # the model in each API server, no worker processes (serving/dispatch/in_process.py)
    api_servers: int | None = None
    threads: int | None = None
    timeout: float = 30.0
    hang_timeout: float = 10.0  # a worker holding a batch this long (and 10x its recent batches) is hung
    header_timeout: float = 10.0  # a request's headers must arrive within this
    body_timeout: float = 30.0  # and its body within this after them
    max_payload_mb: float = 16.0
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    log_level: str = "info"
    access_log: bool = False
    drift_window: int = 1000  # answers of each version live drift is measured over; 0: off
    drift_psi: tuple[float, float] = Thresholds.psi  # WARN, DRIFT (BENCHMARKS.md, monitoring, for these defaults)
    drift_low_confidence: tuple[float, float] = Thresholds.low_confidence
    drift_shift: tuple[float, float] = Thresholds.shift
    log_payloads: str | None = None  # a folder (JSON lines) or an http(s) URL (CloudEvents)
    log_sample: float = 1.0
    log_inputs: bool = False
    log_max_mb: float = 100.0  # a log file is rotated past this
    rollout: str = "none"  # none: a new version takes all traffic once loaded; shadow | canary (control/rollout.py)
    shadow_sample: float = 1.0  # the share of requests a shadow candidate runs a copy of
    canary_percent: float = 10.0  # the percent of requests a canary answers
    rollout_requests: int = 1000  # compared requests that end a rollout
    min_agreement: float = 0.9  # top-1 agreement a candidate needs (BENCHMARKS.md, rollouts, for this default)

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        need(
            self.model_control in MODEL_CONTROL,
            f"--model-control must be one of {', '.join(MODEL_CONTROL)}, got {self.model_control!r}",
        )
        need(
            self.version_policy in VERSION_POLICIES,
            f"--version-policy must be one of {', '.join(VERSION_POLICIES)}, got {self.version_policy!r}",
        )
        need(self.poll_interval > 0, f"--poll-interval must be a positive number of seconds, got {self.poll_interval}")
        need(
            not self.load_models or self.model_control == "explicit",
            "--load-model chooses what explicit model control loads at start; add --model-control explicit",
        )
        need(
            not self.in_process or self.model_control == "none",
            "--in-process serves the models loaded at start (each API server holds its own copy); use "
            "--model-control none, or leave out --in-process to load and unload models while serving",
        )
        need(self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        need(self.host in HOSTS, f"--host must be one of {', '.join(HOSTS)} (LitServe binds these), got {self.host!r}")
        need(1024 <= self.port <= 65535, f"--port must be between 1024 and 65535, got {self.port}")
        need(
            self.grpc_port is None or 1024 <= self.grpc_port <= 65535,
            f"--grpc-port must be between 1024 and 65535, got {self.grpc_port}",
        )
        need(self.grpc_port != self.port, f"--grpc-port must differ from --port (both are {self.port})")
        need(
            1 <= self.max_batch_size <= 1024, f"--max-batch-size must be between 1 and 1024, got {self.max_batch_size}"
        )
        need(
            0 <= self.batch_timeout < self.timeout,
            f"--batch-timeout must be >= 0 and below --timeout ({self.timeout}s), got {self.batch_timeout}",
        )
        need(self.workers_per_device >= 1, f"--workers-per-device must be at least 1, got {self.workers_per_device}")
        need(self.api_servers is None or self.api_servers >= 1, f"--api-servers must be >= 1, got {self.api_servers}")
        need(self.threads is None or self.threads >= 1, f"--threads must be at least 1, got {self.threads}")
        need(self.timeout > 0, f"--timeout must be positive, got {self.timeout}")
        for flag, value in (
            ("--hang-timeout", self.hang_timeout),
            ("--header-timeout", self.header_timeout),
            ("--body-timeout", self.body_timeout),
        ):
            need(value > 0, f"{flag} must be a positive number of seconds, got {value}")
        need(self.max_payload_mb > 0, f"--max-payload-mb must be positive, got {self.max_payload_mb}")
        need(
            self.api_key is None or bool(self.api_key.strip()),
            "the API key is empty; set MODELSHIP_API_KEY or --api-key to a non-empty value",
        )
        levels = ", ".join(LOG_LEVELS)
        need(self.log_level in LOG_LEVELS, f"--log-level must be one of {levels}, got {self.log_level!r}")
        for origin in self.cors_origins:
            need(is_origin(origin), f"--cors-origin {origin!r} is not an origin; expected * or scheme://host[:port]")
        self._check_monitoring(need)
        self._check_rollout(need)

    def _check_rollout(self, need: Callable[[bool, str], None]) -> None:
        need(self.rollout in ROLLOUTS, f"--rollout must be one of {', '.join(ROLLOUTS)}, got {self.rollout!r}")
        need(0 < self.shadow_sample <= 1, f"--shadow-sample must be above 0 and at most 1, got {self.shadow_sample}")
        need(
            0 < self.canary_percent < 100, f"--canary-percent must be above 0 and below 100, got {self.canary_percent}"
        )
        need(
            1 <= self.rollout_requests <= 10_000_000,
            f"--rollout-requests must be 1 to 10000000, got {self.rollout_requests}",
        )
        need(0 <= self.min_agreement <= 1, f"--min-agreement must be 0 to 1, got {self.min_agreement}")
        for flag, mode, value in (("--shadow-sample", "shadow", self.shadow_sample),
                                  ("--canary-percent", "canary", self.canary_percent)):  # fmt: skip
            given = value != getattr(ServeConfig, flag[2:].replace("-", "_"))
            need(not given or self.rollout == mode, f"{flag} goes with --rollout {mode}")
        if self.rollout == "none":
            return
        need(
            self.version_policy == "latest",
            f"--rollout {self.rollout} compares a new version with the one it replaces; --version-policy all serves "
            "every version side by side: use --version-policy latest",
        )
        need(
            self.model_control in ("poll", "explicit"),
            f"--rollout {self.rollout} rolls out versions that arrive while serving: add --model-control poll (or "
            "explicit)",
        )

    @property
    def policy(self) -> Policy:
        """How this server rolls out new versions."""
        return Policy(self.rollout, self.shadow_sample, self.canary_percent, self.rollout_requests,
                      self.min_agreement, drift=self.drift_window > 0)  # fmt: skip

    def _check_monitoring(self, need: Callable[[bool, str], None]) -> None:
        need(0 <= self.drift_window <= 1_000_000, f"--drift-window must be 0 (off) to 1000000, got {self.drift_window}")
        Thresholds(self.drift_psi, self.drift_low_confidence, self.drift_shift)  # ConfigError naming a bad pair
        need(
            0 < self.log_sample <= 1,
            f"--log-sample must be a share of requests, above 0 and at most 1, got {self.log_sample}",
        )
        need(self.log_max_mb > 0, f"--log-max-mb must be positive, got {self.log_max_mb}")
        need(self.log_payloads is not None or not self.log_inputs, "--log-inputs goes with --log-payloads DEST")
        if self.log_payloads is not None:
            check_destination(self.log_payloads)

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(self.drift_psi, self.drift_low_confidence, self.drift_shift)

    @property
    def max_bytes(self) -> int:
        return int(self.max_payload_mb * (1 << 20))


@dataclass(frozen=True)
class Settings:
    """What both sides need to know; pickled into every worker process."""

    run_dir: str  # the server's private folder: the model table, the transport's sockets
    source: str  # what was served: a bundle or a repository (its folder's name only is shown)
    model_control: str
    backend: str
    max_batch_size: int
    batch_timeout: float
    timeout: float
    threads: int
    workers_per_device: int
    in_process: bool
    device: str
    max_payload_mb: float
    api_key_required: bool
    main_pid: int  # the server's main process: workers exit when it is gone
    log_level: str = "info"
    version_policy: str = "latest"
    devices: int = 1  # GPUs used (1 on CPU)
    copies: int = 1  # copies of each model the server runs: its workers, or its API servers with --in-process
    drift_window: int = 0
    log_payloads: str | None = None
    log_sample: float = 1.0
    log_inputs: bool = False
    log_max_mb: float = 100.0
    rollout: str = "none"

    @property
    def max_bytes(self) -> int:
        return int(self.max_payload_mb * (1 << 20))

    @classmethod
    def from_config(cls, cfg: ServeConfig, device: str, devices: int, models: int, run_dir: str) -> Settings:
        """What the API servers and workers of a server for `cfg` need: `device` (cpu or cuda) and how many, the
        copies of the model it runs (`models`: they share the cores) and its private run folder."""
        return cls(
            run_dir=run_dir,
            source=str(cfg.bundle.resolve()),
            model_control=cfg.model_control,
            backend=cfg.backend,
            max_batch_size=cfg.max_batch_size,
            batch_timeout=cfg.batch_timeout,
            timeout=cfg.timeout,
            threads=cfg.threads or max(1, (os.cpu_count() or 1) // models),
            workers_per_device=cfg.workers_per_device,
            in_process=cfg.in_process,
            device=device,
            max_payload_mb=cfg.max_payload_mb,
            api_key_required=cfg.api_key is not None,
            main_pid=os.getpid(),
            log_level=cfg.log_level,
            version_policy=cfg.version_policy,
            devices=devices,
            copies=models,
            drift_window=cfg.drift_window,
            log_payloads=cfg.log_payloads,
            log_sample=cfg.log_sample,
            log_inputs=cfg.log_inputs,
            log_max_mb=cfg.log_max_mb,
            rollout=cfg.rollout,
        )


def is_origin(text: str) -> bool:
    """`*` or a bare origin such as https://app.example.com:8443 (no path, query or trailing slash)."""
    if text == "*":
        return True
    parts = urlsplit(text)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not (parts.path or parts.query)


def check_destination(dest: str) -> None:
    """ConfigError now, before the server starts, for a --log-payloads folder that cannot be written or a URL that
    is not one."""
    if dest.startswith(("http://", "https://")):
        return
    if "://" in dest:
        raise ConfigError(f"--log-payloads {dest}: expected a folder or an http(s):// URL (a CloudEvents sink)")
    folder = Path(dest)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"--log-payloads {dest}: cannot write there ({e.strerror or e}); pick a folder you can write"
        ) from None
