"""Each process's window of the answers its model versions gave: the predicted class, the top-1 confidence and the
input's per-channel means of the last N answers, and when. The worker notes a batch while it runs it (a reference
to its arrays) and works the figures out only after the batch's answers have gone (`flush`, called by the
dispatcher), so live drift costs the answer path nothing; every SNAPSHOT_EVERY seconds the windows that changed are
written to the run folder, where the main process merges every process's (serving/monitoring/drift.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from modelship.reference import top1

SNAPSHOT_EVERY = 0.5  # seconds between a process's snapshots of a window that changed
FOLDER = "drift"


class Window:
    """A ring of the last `size` answers of one model version in one process."""

    def __init__(self, size: int, channels: int) -> None:
        self.t = np.zeros(size, np.float64)
        self.pred = np.zeros(size, np.int32)
        self.conf = np.zeros(size, np.float64)
        self.means = np.zeros((size, channels), np.float64)
        self.total = 0

    def add(self, t: float, pred: np.ndarray, conf: np.ndarray, means: np.ndarray) -> None:
        size = len(self.t)
        n = len(pred)
        if n > size:  # only the newest fit
            pred, conf, means, self.total = pred[-size:], conf[-size:], means[-size:], self.total + n - size
            n = size
        at = (self.total + np.arange(n)) % size
        self.t[at], self.pred[at], self.conf[at], self.means[at] = t, pred, conf, means
        self.total += n

    def ordered(self) -> dict[str, np.ndarray]:
        """The answers held, oldest first."""
        size = len(self.t)
        n = min(self.total, size)
        order = (self.total - n + np.arange(n)) % size
        return {"t": self.t[order], "pred": self.pred[order], "conf": self.conf[order], "means": self.means[order]}


class Recorder:
    """One process's windows, one per model version it answers for."""

    def __init__(self, run_dir: str, size: int) -> None:
        self.folder = Path(run_dir) / FOLDER
        self.size = size  # 0: live drift is off (--drift-window 0)
        self.windows: dict[str, Window] = {}
        self.pending: list[tuple[str, np.ndarray, np.ndarray]] = []
        self.changed: set[str] = set()
        self.written = 0.0

    def note(self, key: str, logits: np.ndarray, x: np.ndarray) -> None:
        """A batch of version `key` ran: its logits and inputs, to be worked into its window after the answers went."""
        if self.size:
            self.pending.append((key, logits, x))

    def flush(self) -> None:
        """Work the noted batches into their windows; write the windows that changed when a snapshot is due."""
        pending, self.pending = self.pending, []
        now = time.time()
        for key, logits, x in pending:
            pred, conf = top1(logits)
            window = self.windows.get(key)
            if window is None:
                window = self.windows[key] = Window(self.size, x.shape[1])
            window.add(now, pred, conf, x.mean(axis=(2, 3), dtype=np.float64))
            self.changed.add(key)
        if self.changed and time.monotonic() - self.written >= SNAPSHOT_EVERY:
            for key in self.changed:
                self.write(key)
            self.changed.clear()
            self.written = time.monotonic()

    def write(self, key: str) -> None:
        """This process's window of `key` as one file, replaced in one rename (a reader sees it whole)."""
        folder = self.folder / key.replace("/", "@")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{os.getpid()}.npz"
        arrays = self.windows[key].ordered()
        with open(tmp, "wb") as f:
            np.savez(f, t=arrays["t"], pred=arrays["pred"], conf=arrays["conf"], means=arrays["means"])
        os.replace(tmp, folder / f"{os.getpid()}.npz")


def merged(run_dir: str, key: str, size: int) -> dict[str, np.ndarray]:
    """The newest `size` answers of version `key` over every process's last snapshot, oldest first."""
    folder = Path(run_dir) / FOLDER / key.replace("/", "@")
    parts = []
    for path in sorted(folder.glob("[0-9]*.npz")) if folder.is_dir() else []:
        try:
            with np.load(path) as f:
                parts.append({k: f[k] for k in ("t", "pred", "conf", "means")})
        except (OSError, ValueError, KeyError):
            continue  # a file a dead process left half-written never is: it was renamed whole; skip what cannot be read
    if not parts:
        return {"t": np.zeros(0), "pred": np.zeros(0, np.int32), "conf": np.zeros(0), "means": np.zeros((0, 1))}
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(joined["t"], kind="stable")[-size:]
    return {k: v[order] for k, v in joined.items()}
