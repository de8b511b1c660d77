"""Where a training process runs: its place in a data-parallel job, its device, its seeds."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist

from modelship.devices import cpu_flags
from modelship.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) data-parallel job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()


def init_distributed(device: str) -> Dist:
    """Join the process group torchrun describes (NCCL on GPU, Gloo on CPU); a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        torch_dist.init_process_group(backend="nccl" if on_gpu else "gloo")
    return Dist(rank, world, local)


def close_distributed(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def resolve_device(name: str, local_rank: int) -> torch.device:
    """auto -> cuda when usable, else cpu; `cuda` without CUDA is a usage error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda but no CUDA device is usable here (torch.cuda.is_available() is False); "
            "use --device cpu or auto"
        )
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


NATIVE_CPU = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def native(dtype: str, device: torch.device) -> str | None:
    """What runs `dtype` natively here (e.g. 'AVX512-BF16', 'CUDA sm_80'), or None when it would be emulated."""
    if device.type == "cuda":
        if dtype == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            return None
        major, minor = torch.cuda.get_device_capability(device)
        return f"CUDA sm_{major}{minor}"
    found = [f for f in NATIVE_CPU[dtype] if f in cpu_flags()]
    return found[0].upper().replace("_", "-") if found else None


@dataclass(frozen=True)
class Precision:
    """The autocast dtype (None: fp32) and why it was chosen, for the run's first line."""

    dtype: torch.dtype | None
    note: str


FASTER = 1.05  # auto takes bf16 only when a trial measured it at least this much faster than fp32


def resolve_precision(requested: str, device: torch.device, trial: Callable[[torch.dtype | None], float] | None = None,
                      reuse: str | None = None) -> Precision:  # fmt: skip
    """auto: fp32 where bf16 is not native; where it is, bf16 only when `trial` (seconds per train step of the real
    model and batch, by autocast dtype) measures it faster: native bf16 was 1.4-1.9x fp32 on one CPU and 0.77x on
    another with the same flags, so flags alone cannot tell (as cudnn.benchmark, measure). A resumed run `reuse`s
    its choice, so resuming stays bit-exact. bf16/fp16 as asked, with a warning where they are emulated."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if requested == "off":
        return Precision(None, "fp32 (--amp off)")
    if requested == "auto":
        why = native("bf16", device)
        if why is None:
            return Precision(None, f"fp32 (no native bf16 on this {device.type}; --amp bf16 to force it)")
        if reuse in ("bf16", "fp32"):
            return Precision(torch.bfloat16 if reuse == "bf16" else None, f"{reuse} (as the run being resumed chose)")
        if trial is None:  # DDP and --deterministic: the flags alone, so every rank and every run agrees
            return Precision(torch.bfloat16, f"bf16 autocast ({why}; no timed trial)")
        fp32, bf16 = trial(None), trial(torch.bfloat16)
        ratio = fp32 / bf16
        if ratio >= FASTER:
            return Precision(
                torch.bfloat16, f"bf16 autocast ({why}; measured {ratio:.2f}x fp32 on this model and batch)"
            )
        return Precision(None, f"fp32 (bf16 on {why} measured {ratio:.2f}x fp32 on this model and batch: not faster)")
    why = native(requested, device)
    if why is None:
        log.warning(
            "--amp %s: this %s has no native %s, so it is emulated and likely slower than --amp off", requested,
            device.type, requested,
        )  # fmt: skip
        why = "emulated"
    return Precision(dtypes[requested], f"{requested} autocast ({why})")


def wants_channels_last(requested: bool | None, model: torch.nn.Module) -> bool:
    """channels_last where it is faster: for convolutional models, on CPU and GPU alike (BENCHMARKS.md)."""
    if requested is not None:
        return requested
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
