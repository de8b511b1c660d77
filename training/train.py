"""The training stage: `train(cfg) -> Path` to the best checkpoint.

Data order is a function of (seed, epoch) alone and every RNG, optimizer, scheduler and scaler state goes into the
checkpoint, so on CPU a run killed after epoch k and resumed gives the same weights, bit for bit, as one that never
stopped. Under `torchrun` the same command trains data-parallel; only rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelship.allocator import keep_freed_memory
from modelship.errors import CheckpointError, ConfigError
from modelship.files import remove_stale_temps
from modelship.training import checkpoint as ckpt_io
from modelship.training.cache import Decoded, check_cache_dir, to_tensors
from modelship.training.config import TrainConfig, run_files
from modelship.training.data import DataInfo, DataRequest, Loaded, default_data_dir, load_data
from modelship.training.loaders import make_loaders, start_epoch
from modelship.training.loop import StepContext, evaluate, reduce_means, step_trial, train_one_epoch
from modelship.training.models import (
    build_model,
    check_output,
    clean_state_dict,
    freeze_backbone,
    load_matching,
    load_pretrained,
    model_kwargs,
)
from modelship.training.optim import make_optimizer, make_scheduler
from modelship.training.runlog import RunLog, progress_bar
from modelship.training.runtime import (
    Dist,
    Precision,
    close_distributed,
    init_distributed,
    resolve_device,
    resolve_precision,
    seed_everything,
    wants_channels_last,
)

log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> Path:
    """Train as `cfg` says; return the path of the best checkpoint."""
    dist = init_distributed(cfg.device)
    try:
        return _train(cfg, dist)
    finally:
        close_distributed(dist)


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint and restored on resume."""

    epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    early: dict[str, Any] = field(default_factory=lambda: {"best_val_acc": -1.0, "best_epoch": 0, "bad_epochs": 0})


def _train(cfg: TrainConfig, dist: Dist) -> Path:
    started = time.perf_counter()
    keep_freed_memory()
    device = resolve_device(cfg.device, dist.local_rank)
    seed_everything(cfg.seed, cfg.deterministic)
    data, decoded = prepare_data(cfg, dist, device)
    resume = load_resume(cfg.resume) if cfg.resume else None
    model, kwargs = prepare_model(cfg, data.info, resume)
    channels_last = wants_channels_last(cfg.channels_last, model)
    net = place_model(cfg, model, dist, device, channels_last)
    precision = choose_precision(cfg, dist, model, data.info, device, channels_last, resume)

    sets, pre = (data.train, data.val), data.info.preprocess
    train_loader, val_loader, train_sampler = make_loaders(cfg, sets, decoded, pre, data.augment, dist, device)
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt, len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=precision.dtype == torch.float16)
    ctx = StepContext(device, precision.dtype, scaler, channels_last, cfg.clip_grad)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    progress = restore(resume, opt, sched, scaler, cfg.resume, cfg.epochs) if resume is not None else Progress()

    notes = [precision.note, "channels_last" if channels_last else "contiguous", data.note]
    notes.append(f"ready {time.perf_counter() - started:.1f}s after start")
    run_log = start_run_log(cfg, dist, progress, data, device, notes)
    ckpt_dir = cfg.out / "checkpoints"
    saved: dict[str, Any] = {"optimizer": opt, "scheduler": sched, "scaler": scaler}
    try:
        for epoch in range(progress.epoch, cfg.epochs):
            start_epoch(train_loader, train_sampler, cfg.seed, epoch)
            t0 = time.perf_counter()
            bar, advance = progress_bar(len(train_sampler), epoch + 1, cfg.epochs) if dist.is_main else (None, None)
            with bar or contextlib.nullcontext():
                tr = train_one_epoch(net, train_loader, loss_fn, opt, sched, ctx, advance)
            train_seconds = time.perf_counter() - t0
            tr_mean = reduce_means(tr, dist, device)
            va = reduce_means(evaluate(model, val_loader, loss_fn, ctx), dist, device)
            improved = record_epoch(progress, epoch, len(train_loader), opt, tr_mean, va, train_seconds, t0)
            if dist.is_main:
                assert run_log is not None
                state = ckpt_io.build_checkpoint(
                    model={"arch": cfg.model, "kwargs": kwargs},
                    state_dict=clean_state_dict(model.state_dict()),
                    data=data.info.to_dict(),
                    progress=progress_dict(progress, tr_mean, va),
                    resume={k: v.state_dict() for k, v in saved.items()},
                    config=cfg.to_dict(),
                )
                state["amp"] = amp_label(precision.dtype)  # what a resume with --amp auto reuses
                save_checkpoints(state, ckpt_dir, improved)
                run_log.epoch(progress.history[-1], progress.global_step, cfg.epochs, improved)
            dist.barrier()
            if cfg.patience is not None and progress.early["bad_epochs"] >= cfg.patience:
                log.info("early stopping: val_acc has not improved for %d epochs", cfg.patience)
                break
    finally:
        if run_log is not None:
            run_log.close()
    best = progress.early
    log.info("best val_acc %.4f at epoch %d: %s", best["best_val_acc"], best["best_epoch"], ckpt_dir / "best.pt")
    return ckpt_dir / "best.pt"


def choose_precision(cfg: TrainConfig, dist: Dist, model: nn.Module, info: DataInfo, device: torch.device,
                     channels_last: bool, resume: dict[str, Any] | None) -> Precision:  # fmt: skip
    """--amp, with auto decided by a timed trial of the real model and batch, or as the run being resumed chose.
    Where runs must agree, by the flags alone: DDP ranks, and --deterministic runs (a trial's timing can come out
    either way on a busy machine, so two identical commands could train in different precisions)."""
    timed = not dist.enabled and not cfg.deterministic
    trial = step_trial(model, tuple(info.input_shape), cfg.batch_size, device, channels_last) if timed else None
    return resolve_precision(cfg.amp, device, trial, resume.get("amp") if resume is not None else None)


def save_checkpoints(state: dict[str, Any], ckpt_dir: Path, improved: bool) -> None:
    """last.pt every epoch, best.pt when validation accuracy improved; each written whole or not at all."""
    ckpt_io.atomic_torch_save(state, ckpt_dir / "last.pt")
    if improved:
        ckpt_io.atomic_torch_save(state, ckpt_dir / "best.pt")


def prepare_data(cfg: TrainConfig, dist: Dist, device: torch.device) -> tuple[Loaded, tuple[Decoded, Decoded] | None]:
    """The splits, and their decoded tensors on their device when --data-cache decodes them; rank 0 first, so what
    is written on first use (shapes, the decoded cache) is written once."""
    data_dir = cfg.data_dir or default_data_dir()
    if cfg.cache_dir is not None:
        check_cache_dir(cfg.cache_dir)
    req = DataRequest(
        name=cfg.data,
        data_dir=data_dir,
        val_split=cfg.val_split,
        seed=cfg.seed,
        shapes_train=cfg.shapes_train,
        shapes_val=cfg.shapes_val,
        image_size=cfg.image_size,
        augment=cfg.augment,
        download=cfg.download,
        imagenet_stats=cfg.pretrained,
        data_cache=cfg.data_cache,
        cache_dir=cfg.cache_dir or data_dir / "decoded",
        device=str(device),
    )
    if not dist.is_main:
        dist.barrier()
    data = load_data(req)
    if dist.is_main:
        dist.barrier()
    if data.arrays is None:
        return data, None
    target = device if data.place == "gpu" else torch.device("cpu")
    sets = (data.train, data.val)
    train, val = (to_tensors(a, ds.targets, target) for a, ds in zip(data.arrays, sets, strict=True))
    return data, (train, val)


def prepare_model(cfg: TrainConfig, info: DataInfo, resume: dict[str, Any] | None) -> tuple[nn.Module, dict[str, Any]]:
    """The model built, checked on a dry batch, initialised (resume, pretrained or --init-from), optionally frozen."""
    kwargs = model_kwargs(cfg.model, len(info.classes), info.input_shape, cfg.model_kwargs)
    model = build_model(cfg.model, kwargs)
    check_output(model, info.input_shape, len(info.classes), cfg.model)
    if resume is not None:
        assert cfg.resume is not None
        check_resume(resume, cfg, kwargs, info, cfg.resume)
        model.load_state_dict(resume["state_dict"])
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
    return model, kwargs


def load_resume(path: Path) -> dict[str, Any]:
    """The checkpoint --resume names, with messages for the files people pass by mistake."""
    flag = f"--resume {path}"
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(f"{flag} is an ONNX export, not a training checkpoint; resume from "
                              "RUN_DIR/checkpoints/last.pt")  # fmt: skip
    try:
        obj = ckpt_io.read_torch_file(path)
    except CheckpointError as e:
        raise CheckpointError(
            f"{flag}: {e}; a file cut short (a full disk, an interrupted copy) reads like this: resume from another "
            "checkpoint of the run, e.g. best.pt beside it"
        ) from None
    if ckpt_io.is_state_dict(obj):
        raise CheckpointError(
            f"{flag} is a bare state_dict (weights only): it holds no optimizer, schedule or epoch to resume; start a "
            f"new run from its weights with --init-from {path}"
        )
    return ckpt_io.validate(obj, path)


def check_resume(state: dict[str, Any], cfg: TrainConfig, kwargs: dict[str, Any], info: DataInfo, path: Path) -> None:
    """A checkpoint resumes only the run it came from: same data, same model, epochs left to train."""
    data = state["data"]
    if list(data["input_shape"]) != info.input_shape or list(data["classes"]) != info.classes:
        raise CheckpointError(
            f"--resume {path} was trained on input {data['input_shape']} with classes {data['classes']}; this data "
            f"gives {info.input_shape} with {info.classes}. Resume with the same --data and --image-size"
        )
    theirs, ours = same_data(data.get("source", {})), same_data(info.source)
    if theirs != ours:
        raise CheckpointError(
            f"--resume {path} was trained on {theirs}; this run reads {ours}. Their class names match, but the "
            "run's history would mix two validation sets: resume with the same --data, or start a new run"
        )
    have = state["model"]
    if have["arch"] != cfg.model or dict(have["kwargs"]) != kwargs:
        raise CheckpointError(
            f"--resume {path} holds {have['arch']} {dict(have['kwargs'])}; this run builds {cfg.model} {kwargs}. "
            "Resume with the same --model and --model-kwargs"
        )
    if state["epoch"] >= cfg.epochs:
        raise ConfigError(
            f"--resume {path} has already completed {state['epoch']} epochs; --epochs is the total, "
            f"so set it above {state['epoch']}"
        )


def amp_label(dtype: torch.dtype | None) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp16" if dtype == torch.float16 else "fp32"


def same_data(source: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs' data the same: a folder's path; a built-in dataset's name and settings (where its files
    live does not matter: shapes is regenerated from its seed, torchvision's files are the same anywhere)."""
    builtin = source.get("name") != "imagefolder"
    return {k: v for k, v in source.items() if not (builtin and k == "root")}


def place_model(cfg: TrainConfig, model: nn.Module, dist: Dist, device: torch.device, channels_last: bool) -> nn.Module:
    """The model on its device and memory format, wrapped for DDP and torch.compile as asked; returns what to call."""
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
    return net


def restore(state: dict[str, Any], opt: Any, sched: Any, scaler: torch.amp.GradScaler, path: Path | None,
            total_epochs: int) -> Progress:  # fmt: skip
    """Optimizer, scheduler, scaler and RNG states and the run's progress, from the checkpoint at `path`. A run
    continued to more epochs than it was planned for keeps its step count and follows the schedule planned for the
    new total from there (a one-cycle schedule's state holds its old total, and stepping past it fails)."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]  # the new plan's group keys
    opt.load_state_dict(state["optimizer"])
    planned = int(state.get("config", {}).get("epochs", 0))
    if planned == total_epochs:
        sched.load_state_dict(state["scheduler"])
    else:
        for group, keys in zip(opt.param_groups, fresh, strict=True):  # e.g. one-cycle's max_lr, when the run was
            for k, v in keys.items():  # planned too short for one-cycle and ran a flat schedule
                group.setdefault(k, v)
        replan(sched, opt, int(state["scheduler"]["last_epoch"]))
        log.info("the learning-rate schedule planned for %d epochs is re-planned for %d, from step %d", planned,
                 total_epochs, int(state["scheduler"]["last_epoch"]))  # fmt: skip
    scaler.load_state_dict(state["scaler"])
    ckpt_io.restore_rng(state["rng"])
    progress = Progress(int(state["epoch"]), int(state["global_step"]), list(state.get("history", [])))
    progress.early = dict(state.get("early_stopping", progress.early))
    log.info("resumed from %s at epoch %d", path, progress.epoch)
    return progress


def replan(sched: Any, opt: Any, step: int) -> None:
    """Put a freshly planned schedule at `step`: the learning rates (and one-cycle's momentum) it gives there."""
    sched.last_epoch = step
    sched._get_lr_called_within_step = True  # get_lr() outside step() warns otherwise; this is what step() does
    try:
        lrs = sched.get_lr()
    finally:
        sched._get_lr_called_within_step = False
    for group, lr in zip(opt.param_groups, lrs, strict=True):
        group["lr"] = lr
    sched._last_lr = list(lrs)


def start_run_log(
    cfg: TrainConfig, dist: Dist, progress: Progress, data: Loaded, device: torch.device, notes: list[str]
) -> RunLog | None:
    """Rank 0: the run directory, config.json, metrics and the run's first line; None on other ranks."""
    if not dist.is_main:
        return None
    ckpt_dir = cfg.out / "checkpoints"
    if cfg.force and cfg.resume is None:  # --force: the earlier run goes, as a whole, once this one is ready
        for name in run_files(cfg.out):
            path = cfg.out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(ckpt_dir)
    (cfg.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    run_log = RunLog(cfg.out, progress.history, progress.global_step)
    info = data.info
    log.info(
        "training %s on %s (%d train / %d val, %d classes, input %s, augment %s) on %s%s: %s",
        cfg.model, cfg.data, len(data.train), len(data.val), len(info.classes), info.input_shape,
        "on" if data.augment else "off", device, f" x{dist.world_size} ranks" if dist.enabled else "",
        ", ".join(notes),
    )  # fmt: skip
    return run_log


def record_epoch(
    progress: Progress,
    epoch: int,
    steps: int,
    opt: torch.optim.Optimizer,
    tr: dict[str, float],
    va: dict[str, float],
    train_seconds: float,
    t0: float,
) -> bool:
    """Append the epoch's metrics row and update early stopping; True when val_acc improved."""
    progress.epoch = epoch + 1
    progress.global_step += steps
    progress.history.append(
        {
            "epoch": epoch + 1,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": round(tr["loss"], 6),
            "train_acc": round(tr["acc"], 6),
            "val_loss": round(va["loss"], 6),
            "val_acc": round(va["acc"], 6),
            "seconds": round(time.perf_counter() - t0, 3),
            "samples_per_s": round(tr["n"] / train_seconds, 1),
        }
    )
    early = progress.early
    improved = va["acc"] > early["best_val_acc"]
    if improved:
        early.update(best_val_acc=va["acc"], best_epoch=epoch + 1, bad_epochs=0)
    else:
        early["bad_epochs"] += 1
    return improved


def progress_dict(progress: Progress, tr: dict[str, float], va: dict[str, float]) -> dict[str, Any]:
    """The checkpoint's progress keys."""
    return {
        "epoch": progress.epoch,
        "global_step": progress.global_step,
        "metrics": {"val_acc": va["acc"], "val_loss": va["loss"], "train_acc": tr["acc"], "train_loss": tr["loss"]},
        "history": list(progress.history),
        "early_stopping": dict(progress.early),
    }
