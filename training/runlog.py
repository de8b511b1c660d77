"""What a run leaves for people: metrics.jsonl, TensorBoard events, a progress bar or plain log lines (rank 0)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCALARS = ("lr", "train_loss", "train_acc", "val_loss", "val_acc", "samples_per_s")


class RunLog:
    """metrics.jsonl and TensorBoard events, rewritten from the checkpoint's history on resume."""

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

    def epoch(self, row: dict[str, Any], step: int, epochs: int, best: bool) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key in SCALARS:
            self.tb.add_scalar(key, row[key], step)
        self.tb.flush()
        log.info(
            "epoch %d/%d  train_loss %.4f  train_acc %.4f  val_loss %.4f  val_acc %.4f  %.1fs  %.0f samples/s%s",
            row["epoch"], epochs, row["train_loss"], row["train_acc"], row["val_loss"], row["val_acc"],
            row["seconds"], row["samples_per_s"], "  *best*" if best else "",
        )  # fmt: skip

    def close(self) -> None:
        self.tb.close()


def progress_bar(total_steps: int, epoch: int, epochs: int) -> tuple[Any, Callable[[int], None] | None]:
    """A rich progress bar on a terminal; nothing (plain log lines per epoch) otherwise."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext(), None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    )
    task = bar.add_task("train", total=total_steps)
    return bar, lambda n: bar.advance(task, n)
