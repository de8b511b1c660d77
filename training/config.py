"""TrainConfig: every training option, validated with messages that say how to fix the value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelship.devices import DEVICES
from modelship.errors import ConfigError

OPTIMIZERS = ("adamw", "sgd", "adam")
SCHEDULES = ("cosine", "step", "onecycle")
AMP_MODES = ("auto", "off", "bf16", "fp16")
DATA_CACHE_MODES = ("auto", "ram", "gpu", "off")
DEFAULT_LR = {"adamw": 3e-3, "adam": 1e-3, "sgd": 0.05}


@dataclass(frozen=True)
class TrainConfig:
    """Options of `modelship train`; see README.md for each flag."""

    out: Path
    data: str = "shapes"
    data_dir: Path | None = None
    download: bool = False
    val_split: float = 0.2
    shapes_train: int = 2000
    shapes_val: int = 500
    image_size: tuple[int, int] | None = None
    augment: bool | None = None
    model: str = "cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    init_from: Path | None = None
    freeze_backbone: bool = False
    pretrained: bool = False
    epochs: int = 5
    batch_size: int = 64
    lr: float | None = None
    weight_decay: float = 0.05
    momentum: float = 0.9
    optimizer: str = "adamw"
    schedule: str = "onecycle"  # short runs train best with it (BENCHMARKS.md, training)
    warmup_epochs: float = 0.0
    step_size: int | None = None
    gamma: float = 0.1
    patience: int | None = None
    clip_grad: float | None = None
    label_smoothing: float = 0.0
    balanced_sampler: bool = False
    amp: str = "auto"  # bf16 where the hardware has it natively, fp32 elsewhere
    compile: str | None = None  # a torch.compile backend (inductor, aot_eager, ...) or None
    channels_last: bool | None = None
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False
    workers: int | None = None
    data_cache: str = "auto"
    cache_dir: Path | None = None  # default: DATA_DIR/decoded
    resume: Path | None = None
    force: bool = False  # replace a run already in --out

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        need(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        need(self.lr is None or self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        need(
            self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
        )
        need(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        need(
            0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0,
            f"--warmup-epochs must be >= 0 and below --epochs ({self.epochs}), got {self.warmup_epochs}",
        )
        need(self.step_size is None or self.step_size >= 1, f"--step-size must be at least 1, got {self.step_size}")
        need(0 < self.gamma <= 1, f"--gamma must be in (0, 1], got {self.gamma}")
        need(self.patience is None or self.patience >= 1, f"--patience must be at least 1, got {self.patience}")
        need(self.clip_grad is None or self.clip_grad > 0, f"--clip-grad must be positive, got {self.clip_grad}")
        need(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        need(0 < self.val_split < 1, f"--val-split must be between 0 and 1, got {self.val_split}")
        need(self.shapes_train >= 10, f"--shapes-train must be at least 10, got {self.shapes_train}")
        need(self.shapes_val >= 5, f"--shapes-val must be at least 5, got {self.shapes_val}")
        need(
            self.image_size is None or (len(self.image_size) == 2 and min(self.image_size) >= 1),
            f"--image-size must be H,W with positive values, got {self.image_size}",
        )
        need(self.amp in AMP_MODES, f"--amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        need(self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        need(
            self.data_cache in DATA_CACHE_MODES,
            f"--data-cache must be one of {', '.join(DATA_CACHE_MODES)}, got {self.data_cache!r}",
        )
        need(self.workers is None or self.workers >= 0, f"--workers must be >= 0, got {self.workers}")
        need(
            not (self.pretrained and self.init_from), "--pretrained and --init-from both set initial weights; pick one"
        )
        need(isinstance(self.model_kwargs, dict), "--model-kwargs must be a JSON object, e.g. '{\"width\": 64}'")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(
                f"--out {self.out} is a file; expected a directory for the run (it is created if missing)"
            )
        found = run_files(self.out)
        if found and self.resume is None and not self.force:
            raise ConfigError(
                f"--out {self.out} already holds a run ({', '.join(found)}); continue it with --resume "
                f"{self.out / 'checkpoints' / 'last.pt'}, replace it with --force, or pick another --out"
            )
        need(not (self.force and self.resume), "--force replaces the run in --out and --resume continues it; pick one")
        if self.resume is not None and self.resume.is_dir():
            inside = self.resume / "checkpoints" if (self.resume / "checkpoints").is_dir() else self.resume
            raise ConfigError(
                f"--resume {self.resume} is a folder; expected a checkpoint file, e.g. {inside / 'last.pt'}"
            )
        for flag, path in (("--init-from", self.init_from), ("--resume", self.resume)):
            if path is not None and not path.is_file():
                raise ConfigError(f"{flag} {path} does not exist or is not a file")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def to_dict(self) -> dict[str, Any]:
        """Plain types only: this goes into the checkpoint."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Path):
                v = str(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "config.json")  # what a training run writes in --out


def run_files(out: Path) -> list[str]:
    """The files of an earlier run in `out` (none when it is missing or holds something else)."""
    return [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []
