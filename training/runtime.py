"""Where a training process runs: its place in a data-parallel job, its device, its seeds."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist

from modelship.errors import ConfigError


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
