"""The training loop: `train(cfg) -> Path` to the best checkpoint.

Data order is a function of (seed, epoch) alone and every RNG, optimizer, scheduler and scaler state goes into the
checkpoint, so on CPU a run killed after epoch k and resumed gives the same weights, bit for bit, as one that never
stopped. Under `torchrun` the same command trains data-parallel; only rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from modelship.errors import CheckpointError, ConfigError, DataError
from modelship.training import checkpoint as ckpt_io
from modelship.training.config import TrainConfig
from modelship.training.data import DataInfo, DataRequest, LabelledDataset, default_data_dir, load_data
from modelship.training.models import (
    build_model,
    check_output,
    clean_state_dict,
    freeze_backbone,
    load_matching,
    load_pretrained,
    model_kwargs,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ environment


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


def init_distributed(device_kind: str) -> Dist:
    """Join the process group torchrun describes (NCCL on GPU, Gloo on CPU); a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(rank, world, local)


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
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


# ------------------------------------------------------------------------------------------------ data order


class EpochSampler(Sampler[int]):
    """Indices for one epoch, a function of (seed, epoch) only: shuffled, class-balanced, or in order; sharded by rank.

    Training shards are padded by wrapping so every rank runs the same number of steps (DDP needs that);
    evaluation shards are not, so every validation image counts exactly once.
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int,
        shuffle: bool,
        weights: torch.Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ):
        self.n, self.seed, self.shuffle, self.weights = n, seed, shuffle, weights
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            idx = torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        elif self.shuffle:
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        if self.pad and self.world_size > 1 and len(idx) % self.world_size:
            idx += idx[: self.world_size - len(idx) % self.world_size]
        return idx[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.n / self.world_size)
        return len(range(self.rank, self.n, self.world_size))


def class_weights(targets: list[int]) -> torch.Tensor:
    """Per-sample weights 1/count(class): every class is drawn equally often."""
    t = torch.tensor(targets)
    counts = torch.bincount(t).clamp(min=1).double()
    return (1.0 / counts)[t]


def make_loaders(
    cfg: TrainConfig, train_ds: LabelledDataset, val_ds: LabelledDataset, dist: Dist, device: torch.device
) -> tuple[DataLoader, DataLoader, EpochSampler]:
    workers = (
        cfg.workers
        if cfg.workers is not None
        else (min(8, (os.cpu_count() or 1) // dist.world_size) if device.type == "cuda" else 0)
    )
    weights = class_weights(train_ds.targets) if cfg.balanced_sampler else None
    n_train, n_val = len(train_ds), len(val_ds)
    train_sampler = EpochSampler(
        n_train, seed=cfg.seed, shuffle=True, weights=weights, rank=dist.rank, world_size=dist.world_size
    )
    val_sampler = EpochSampler(
        n_val, seed=cfg.seed, shuffle=False, rank=dist.rank, world_size=dist.world_size, pad=False
    )
    common: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": False,
    }
    # The generator seeds worker RNGs (augmentation); it is reseeded from (seed, epoch) before every epoch.
    train_loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=train_sampler,
        drop_last=False,
        generator=torch.Generator(),
        **common,
    )
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size * 2, sampler=val_sampler, **common)
    return train_loader, val_loader, train_sampler


def _batches(loader: DataLoader) -> Iterator[Any]:
    try:
        yield from loader
    except DataError as e:
        # a DataError raised in a loader worker comes back with the worker's traceback in its message
        raise DataError(str(e).strip().splitlines()[-1].split("DataError: ")[-1]) from None


# ------------------------------------------------------------------------------------------------ optimisation


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = cfg.learning_rate
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def make_scheduler(
    cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule over --epochs with linear warm-up."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle":
        pct = cfg.warmup_epochs / cfg.epochs if cfg.warmup_epochs else 0.25
        pct = min(max(pct, 1.5 / total), 1 - 1.5 / total) if total >= 4 else 0.5  # torch divides by zero under 1 step
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=total, pct_start=pct)
    step_size = (cfg.step_size or max(1, cfg.epochs // 3)) * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "step":
            return cfg.gamma ** ((step - warmup) // step_size)
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ------------------------------------------------------------------------------------------------ epochs


@dataclass
class StepContext:
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


def train_one_epoch(
    net: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    ctx: StepContext,
    progress: Any = None,
) -> dict[str, float]:
    """One pass over the training data; returns mean loss, accuracy and sample count (this rank's)."""
    net.train()
    total_loss = torch.zeros((), device=ctx.device, dtype=torch.float64)
    correct = torch.zeros((), device=ctx.device, dtype=torch.int64)
    seen = 0
    for x, y in _batches(loader):
        x, y = ctx.to_device(x, y)
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
        sched.step()
        total_loss += loss.detach().double() * y.numel()
        correct += (logits.argmax(1) == y).sum()
        seen += y.numel()
        if progress is not None:
            progress(y.numel())
    return {"loss": total_loss.item(), "correct": float(correct.item()), "n": float(seen)}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, ctx: StepContext) -> dict[str, float]:
    """Summed loss, correct count and sample count on this rank's validation shard."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in _batches(loader):
        x, y = ctx.to_device(x, y)
        with ctx.autocast():
            logits = model(x)
        total_loss += loss_fn(logits.float(), y).item() * y.numel()
        correct += int((logits.argmax(1) == y).sum().item())
        seen += y.numel()
    return {"loss": total_loss, "correct": float(correct), "n": float(seen)}


def reduce_sums(stats: dict[str, float], dist: Dist, device: torch.device) -> dict[str, float]:
    """Sum per-rank (loss*n, correct, n) across ranks and return means."""
    t = torch.tensor([stats["loss"], stats["correct"], stats["n"]], dtype=torch.float64, device=device)
    if dist.enabled:
        torch_dist.all_reduce(t)
    loss, correct, n = t.tolist()
    return {"loss": loss / max(n, 1), "acc": correct / max(n, 1), "n": n}


# ------------------------------------------------------------------------------------------------ run


class RunLog:
    """metrics.jsonl, TensorBoard events and the console; rank 0 only."""

    def __init__(self, out: Path, history: list[dict[str, Any]], start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = out / "metrics.jsonl"
        # rewrite from the checkpoint's history: a run killed after logging but before saving left extra lines
        with open(self.path, "w") as f:
            for row in history:
                f.write(json.dumps(row) + "\n")
        if not history:  # a fresh run in an old run directory: do not plot the old run's curves with it
            for old in (out / "tensorboard").glob("events.out.tfevents.*"):
                old.unlink()
        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step or None)

    def epoch(self, row: dict[str, Any], step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key in ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "samples_per_s"):
            self.tb.add_scalar(key, row[key], step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def _progress_bar(total_steps: int, epoch: int, epochs: int) -> tuple[Any, Any]:
    """A rich progress bar on a terminal; nothing (plain log lines per epoch) otherwise."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext(), None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    )
    task = bar.add_task("train", total=total_steps)
    return bar, lambda n: bar.advance(task, n)


def _check_resume(state: dict[str, Any], arch: str, kwargs: dict[str, Any], info: DataInfo, path: Path) -> None:
    data = state["data"]
    if list(data["input_shape"]) != info.input_shape or list(data["classes"]) != info.classes:
        raise CheckpointError(
            f"--resume {path} was trained on input {data['input_shape']} with classes {data['classes']}; this data "
            f"gives {info.input_shape} with {info.classes}. Resume with the same --data and --image-size"
        )
    have = state["model"]
    if have["arch"] != arch or dict(have["kwargs"]) != kwargs:
        raise CheckpointError(
            f"--resume {path} holds {have['arch']} {dict(have['kwargs'])}; this run builds {arch} {kwargs}. "
            "Resume with the same --model and --model-kwargs"
        )


def train(cfg: TrainConfig) -> Path:
    """Train as `cfg` says; return the path of the best checkpoint."""
    dist = init_distributed(
        "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    try:
        return _train(cfg, dist)
    finally:
        if dist.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _train(cfg: TrainConfig, dist: Dist) -> Path:
    device = resolve_device(cfg.device, dist.local_rank)
    seed_everything(cfg.seed, cfg.deterministic)

    # Data: rank 0 first, so a dataset written on first use (shapes) is written once.
    req = DataRequest(
        name=cfg.data,
        data_dir=cfg.data_dir or default_data_dir(),
        val_split=cfg.val_split,
        seed=cfg.seed,
        shapes_train=cfg.shapes_train,
        shapes_val=cfg.shapes_val,
        image_size=cfg.image_size,
        augment=cfg.augment,
        download=cfg.download,
        imagenet_stats=cfg.pretrained,
    )
    if dist.enabled and not dist.is_main:
        torch_dist.barrier()
    train_ds, val_ds, info, augment = load_data(req)
    if dist.enabled and dist.is_main:
        torch_dist.barrier()

    # Model: built, checked on a dry batch, initialised, optionally frozen.
    kwargs = model_kwargs(cfg.model, len(info.classes), info.input_shape, cfg.model_kwargs)
    model = build_model(cfg.model, kwargs)
    check_output(model, info.input_shape, len(info.classes), cfg.model)
    resume_state = ckpt_io.load_checkpoint(cfg.resume) if cfg.resume else None
    if resume_state is not None:
        _check_resume(resume_state, cfg.model, kwargs, info, cfg.resume)  # type: ignore[arg-type]
        if resume_state["epoch"] >= cfg.epochs:
            raise ConfigError(
                f"--resume {cfg.resume} has already completed {resume_state['epoch']} epochs; --epochs is the total, "
                f"so set it above {resume_state['epoch']}"
            )
        model.load_state_dict(resume_state["state_dict"])
    elif cfg.pretrained:
        load_pretrained(model, cfg.model)
    elif cfg.init_from:
        init = ckpt_io.read_torch_file(cfg.init_from)
        init = init["state_dict"] if ckpt_io.is_checkpoint(init) else init
        if not ckpt_io.is_state_dict(init):
            raise CheckpointError(f"--init-from {cfg.init_from} is neither a state_dict nor a modelship checkpoint")
        load_matching(model, init, f"--init-from {cfg.init_from.name}")
    if cfg.freeze_backbone:
        trainable = freeze_backbone(model, cfg.model)
        log.info("--freeze-backbone: training only %s", ", ".join(trainable))

    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        backends = torch._dynamo.list_backends(exclude_tags=())
        if cfg.compile not in backends:
            raise ConfigError(
                f"--compile {cfg.compile}: unknown torch.compile backend; expected one of {', '.join(backends)}"
            )
        net = torch.compile(net, backend=cfg.compile)  # type: ignore[assignment]

    train_loader, val_loader, train_sampler = make_loaders(cfg, train_ds, val_ds, dist, device)
    steps_per_epoch = len(train_loader)
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt, steps_per_epoch)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ctx = StepContext(device, amp_dtype, scaler, channels_last, cfg.clip_grad)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    start_epoch, global_step = 0, 0
    history: list[dict[str, Any]] = []
    early = {"best_val_acc": -1.0, "best_epoch": 0, "bad_epochs": 0}
    if resume_state is not None:
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        start_epoch, global_step = int(resume_state["epoch"]), int(resume_state["global_step"])
        history = list(resume_state.get("history", []))
        early = dict(resume_state.get("early_stopping", early))
        ckpt_io.restore_rng(resume_state["rng"])
        log.info("resumed from %s at epoch %d", cfg.resume, start_epoch)

    ckpt_dir = cfg.out / "checkpoints"
    run_log = None
    if dist.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        ckpt_io.remove_stale_temps(ckpt_dir)
        (cfg.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        run_log = RunLog(cfg.out, history, global_step)
        log.info(
            "training %s on %s (%d train / %d val, %d classes, input %s, augment %s) on %s%s",
            cfg.model,
            cfg.data,
            len(train_ds),
            len(val_ds),
            len(info.classes),
            info.input_shape,
            "on" if augment else "off",
            device,
            f" x{dist.world_size} ranks" if dist.enabled else "",
        )

    base = {
        "format": ckpt_io.FORMAT,
        "version": ckpt_io.VERSION,
        "model": {"arch": cfg.model, "kwargs": kwargs},
        "data": info.to_dict(),
        "config": cfg.to_dict(),
        "versions": ckpt_io.versions(),
    }
    best_path = ckpt_dir / "best.pt"
    try:
        for epoch in range(start_epoch, cfg.epochs):
            train_sampler.set_epoch(epoch)
            train_loader.generator.manual_seed(cfg.seed * 7919 + epoch)
            t0 = time.perf_counter()
            bar, advance = (
                _progress_bar(len(train_sampler), epoch + 1, cfg.epochs)
                if dist.is_main
                else (contextlib.nullcontext(), None)
            )
            with bar:
                tr = train_one_epoch(net, train_loader, loss_fn, opt, sched, ctx, advance)
            train_seconds = time.perf_counter() - t0
            tr_mean = reduce_sums(tr, dist, device)
            va = reduce_sums(evaluate(model, val_loader, loss_fn, ctx), dist, device)
            seconds = time.perf_counter() - t0
            global_step += steps_per_epoch
            row = {
                "epoch": epoch + 1,
                "lr": opt.param_groups[0]["lr"],
                "train_loss": round(tr_mean["loss"], 6),
                "train_acc": round(tr_mean["acc"], 6),
                "val_loss": round(va["loss"], 6),
                "val_acc": round(va["acc"], 6),
                "seconds": round(seconds, 3),
                "samples_per_s": round(tr_mean["n"] / train_seconds, 1),
            }
            history.append(row)
            improved = va["acc"] > early["best_val_acc"]
            if improved:
                early.update(best_val_acc=va["acc"], best_epoch=epoch + 1, bad_epochs=0)
            else:
                early["bad_epochs"] += 1
            if dist.is_main:
                state = {
                    **base,
                    "state_dict": clean_state_dict(model.state_dict()),
                    "epoch": epoch + 1,
                    "global_step": global_step,
                    "metrics": {
                        "val_acc": va["acc"],
                        "val_loss": va["loss"],
                        "train_acc": tr_mean["acc"],
                        "train_loss": tr_mean["loss"],
                    },
                    "history": history,
                    "early_stopping": dict(early),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": ckpt_io.capture_rng(),
                }
                ckpt_io.atomic_torch_save(state, ckpt_dir / "last.pt")
                if improved:
                    ckpt_io.atomic_torch_save(state, best_path)
                assert run_log is not None
                run_log.epoch(row, global_step)
                log.info(
                    "epoch %d/%d  train_loss %.4f  train_acc %.4f  val_loss %.4f  val_acc %.4f  %.1fs  %.0f samples/s%s",  # noqa: E501
                    epoch + 1,
                    cfg.epochs,
                    row["train_loss"],
                    row["train_acc"],
                    row["val_loss"],
                    row["val_acc"],
                    seconds,
                    row["samples_per_s"],
                    "  *best*" if improved else "",
                )
            if dist.enabled:
                torch_dist.barrier()
            if cfg.patience is not None and early["bad_epochs"] >= cfg.patience:
                if dist.is_main:
                    log.info("early stopping: val_acc has not improved for %d epochs", cfg.patience)
                break
    finally:
        if run_log is not None:
            run_log.close()
    if dist.is_main:
        log.info("best val_acc %.4f at epoch %d: %s", early["best_val_acc"], early["best_epoch"], best_path)
    return best_path
