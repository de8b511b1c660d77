"""Optimiser and learning-rate schedule from a TrainConfig."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

from modelship.training.config import TrainConfig


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD (Nesterov); no weight decay on biases and norm weights."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = cfg.learning_rate
    if cfg.optimizer == "sgd":
        return OPTIMIZER_CLASSES["sgd"](groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return OPTIMIZER_CLASSES[cfg.optimizer](groups, lr=lr)


def _eager(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """`cls` as training here runs it, never under torch.compile. torch.optim marks its step and bookkeeping as not
    to be traced by importing torch._dynamo on their first call (1.5 s at start-up and 0.6 s at exit on 2 cores, a
    tenth of a small run) and calling into it on every step; the same methods unwrapped do the same work without it
    (the step under no_grad, as its wrapper sets). Same state_dict, same numbers (tests/training check both)."""
    methods = {name: inspect.unwrap(getattr(cls, name)) for name in _WRAPPED}
    methods["step"] = torch.no_grad()(inspect.unwrap(cls.step))
    return type(cls.__name__, (cls,), {**methods, "__module__": __name__, "__doc__": cls.__doc__})


_WRAPPED = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")
_TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
OPTIMIZER_CLASSES: dict[str, Callable[..., torch.optim.Optimizer]] = {k: _eager(v) for k, v in _TORCH.items()}


def make_scheduler(
    cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule over --epochs with linear warm-up."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle" and total >= 4:  # OneCycleLR divides by zero on fewer steps: those run flat
        pct = cfg.warmup_epochs / cfg.epochs if cfg.warmup_epochs else 0.25
        pct = min(max(pct, 1.5 / total), 1 - 1.5 / total)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=total, pct_start=pct)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    step_size = (cfg.step_size or max(1, cfg.epochs // 3)) * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "step":
            return cfg.gamma ** ((step - warmup) // step_size)
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
