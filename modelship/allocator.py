"""glibc's malloc set for long-running work: memory a step or a request frees is kept for the next, not handed back.

By default glibc maps each block over its mmap threshold (128 KB at first) fresh, and unmaps it when freed; it trims
the top of its heaps as soon as they are free. Work that allocates and frees the same sizes over and over (a
training step's activations, a served request's 600 KB tensor) then has the kernel fault its memory in again, zeroed,
a page at a time: ~10% of a small cnn's training step, about a third of a bare grpc.aio server's CPU on 600 KB calls.
Raising both thresholds (either alone does not help) is what preloading jemalloc or tcmalloc does for PyTorch on CPU,
with the allocator already there; the cost is a process that keeps its peak. Settings are per process and inherited
by a fork; left alone off glibc and where the user tuned malloc (MALLOC_*_ or GLIBC_TUNABLES).
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_FROM = 32 << 20  # the largest mmap threshold glibc takes on 64-bit (HEAP_MAX_SIZE / 2)
KEEP_FREED = 1 << 30  # free memory glibc keeps at the top of its heaps before handing it back


def keep_freed_memory() -> bool:
    """Raise this process's mmap and trim thresholds; True when set, False where left alone."""
    if any(tunes_malloc(k) for k in os.environ) or not glibc():
        return False
    libc = ctypes.CDLL(None)  # this process's C library
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_FROM)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED))


def give_back() -> None:
    """Hand the free heap back to the kernel now (glibc's malloc_trim): after a whole model is dropped, worth it."""
    if glibc():
        ctypes.CDLL(None).malloc_trim(0)


def tunes_malloc(variable: str) -> bool:
    """Whether an environment variable of that name tunes glibc's malloc (then `keep_freed_memory` leaves it be)."""
    return variable.startswith("MALLOC_") or variable == "GLIBC_TUNABLES"


def glibc() -> bool:
    """Whether this process's C library is glibc, whose malloc `mallopt` tunes."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # not a glibc system: the name is unknown there
        return False
