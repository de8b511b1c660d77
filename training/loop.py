"""One epoch of training and one pass of evaluation: sums per rank, reduced to means across ranks."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader

from modelship.training.loaders import batches
from modelship.training.optim import OPTIMIZER_CLASSES
from modelship.training.runtime import Dist


@dataclass
class StepContext:
    """How a batch is placed and computed: device, mixed precision, memory format, gradient clipping."""

    device: torch.device
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    channels_last: bool
    clip_grad: float | None

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, opt: torch.optim.Optimizer,
               ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One optimisation step on a placed batch: forward under the context's autocast, backward, update; (loss,
    logits)."""
    with ctx.autocast():
        logits = net(x)
        loss = loss_fn(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    ctx.scaler.scale(loss).backward()
    if ctx.clip_grad is not None:
        ctx.scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(net.parameters(), ctx.clip_grad)
    ctx.scaler.step(opt)
    ctx.scaler.update()
    return loss, logits


def step_trial(model: nn.Module, shape: tuple[int, ...], batch: int, device: torch.device,
               channels_last: bool) -> Callable[[torch.dtype | None], float]:  # fmt: skip
    """Seconds per training step (`train_step`, as the loop runs it) of a copy of `model` on a random batch, under an
    autocast dtype (None: fp32): one warm-up step, then up to 3 timed ones within about half a second. The real
    model, its optimizer and every RNG are left as they were."""

    def run(dtype: torch.dtype | None) -> float:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            probe = copy.deepcopy(model).to(device).train()
            if channels_last:
                probe = probe.to(memory_format=torch.channels_last)
            scaler = torch.amp.GradScaler(device.type, enabled=False)
            ctx = StepContext(device, dtype, scaler, channels_last, None)
            x, y = ctx.to_device(torch.randn(batch, *shape), torch.zeros(batch, dtype=torch.long))
            opt = OPTIMIZER_CLASSES["sgd"](probe.parameters(), lr=0.0)
            loss_fn = nn.CrossEntropyLoss()
            times = []
            for _ in range(4):
                t0 = time.perf_counter()
                train_step(probe, x, y, loss_fn, opt, ctx)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
                if sum(times[1:]) > 0.5:
                    break
            return min(times[1:])

    return run


def train_one_epoch(
    net: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    ctx: StepContext,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """One pass over this rank's training shard; returns the summed loss, the correct count and the sample count."""
    net.train()
    total_loss = torch.zeros((), device=ctx.device, dtype=torch.float64)
    correct = torch.zeros((), device=ctx.device, dtype=torch.int64)
    seen = 0
    for x, y in batches(loader):
        x, y = ctx.to_device(x, y)
        loss, logits = train_step(net, x, y, loss_fn, opt, ctx)
        sched.step()
        # sums stay on the device: a .item() per step would wait for the GPU every step
        total_loss += loss.detach().double() * y.numel()
        correct += (logits.argmax(1) == y).sum()
        seen += y.numel()
        if progress is not None:
            progress(y.numel())
    return {"loss": total_loss.item(), "correct": float(correct.item()), "n": float(seen)}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, ctx: StepContext) -> dict[str, float]:
    """One pass over this rank's validation shard; returns the summed loss, the correct count and the sample count."""
    model.eval()
    total_loss = torch.zeros((), device=ctx.device, dtype=torch.float64)
    correct = torch.zeros((), device=ctx.device, dtype=torch.int64)
    seen = 0
    for x, y in batches(loader):
        x, y = ctx.to_device(x, y)
        with ctx.autocast():
            logits = model(x)
        # sums stay on the device, as in training: no wait for the GPU per batch
        total_loss += loss_fn(logits.float(), y).double() * y.numel()
        correct += (logits.argmax(1) == y).sum()
        seen += y.numel()
    return {"loss": total_loss.item(), "correct": float(correct.item()), "n": float(seen)}


def reduce_means(sums: dict[str, float], dist: Dist, device: torch.device) -> dict[str, float]:
    """Sum (loss, correct, n) across ranks; return the mean loss, the accuracy and the total sample count."""
    t = torch.tensor([sums["loss"], sums["correct"], sums["n"]], dtype=torch.float64, device=device)
    if dist.enabled:
        torch_dist.all_reduce(t)
    loss, correct, n = t.tolist()
    return {"loss": loss / max(n, 1), "acc": correct / max(n, 1), "n": n}
