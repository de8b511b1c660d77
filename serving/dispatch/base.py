"""What every dispatcher is to the data plane, and the rules both apply to a batch.

Two dispatchers take a validated array to a model version and bring its logits back: the workers' transport
(`transport.Client`, to inference worker processes through the broker) and the in-process runner
(`in_process.Runner`, a thread of this API server). Both gather requests into batches by one window (`fill`) and
leave out the requests whose callers have given up by one rule (`split_late`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import numpy as np

T = TypeVar("T")


class Dispatcher(Protocol):
    """How an API server reaches the models."""

    async def call(self, key: str, x: np.ndarray, timeout: float) -> np.ndarray:
        """The logits of array `x` [n, C, H, W] from model version `key`; RequestError (the status the model side
        gave: 400 for a non-finite input, 503 for a version not loaded there, 500 for a failed forward pass) or
        TimeoutError after `timeout` seconds."""
        ...

    def ready(self) -> bool:
        """The models behind it can answer now."""
        ...


def fill(batch: list[T], max_batch: int, window: float, more: Callable[[float, int], list[T]]) -> list[T]:
    """The batch window: with the first requests in hand, take what arrives within `window` seconds (with a window of
    0, what is already waiting), until there are `max_batch`. `more(wait, room)` waits up to `wait` seconds for more
    (room: how many fit) and returns what came, [] when nothing did; a dispatcher that takes whole messages may
    return more than `room`, and the rest is run in the next batch."""
    deadline = time.monotonic() + window
    while len(batch) < max_batch:
        got = more(max(0.0, deadline - time.monotonic()), max_batch - len(batch))
        if not got:
            break
        batch += got
    return batch


class Queued(Protocol):
    queued_at: float


Q = TypeVar("Q", bound=Queued)


def split_late(batch: list[Q], timeout: float, now: float) -> tuple[list[Q], list[Q]]:
    """(to run, late): a request queued more than `timeout` seconds ago has had its 504 from its API server, which
    stopped waiting for it; running it would only delay the others."""
    fresh = [r for r in batch if now - r.queued_at <= timeout]
    return fresh, [r for r in batch if now - r.queued_at > timeout] if len(fresh) < len(batch) else []
