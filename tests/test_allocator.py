"""glibc's malloc as modelship sets it (the server, training): a request-sized buffer comes from the heap, not from a
fresh mmap each time, and a dropped model's memory goes back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from modelship.allocator import glibc, tunes_malloc

pytestmark = pytest.mark.skipif(not glibc(), reason="mallopt's thresholds are glibc's")
ENV = {k: v for k, v in os.environ.items() if not tunes_malloc(k)}  # so the probes tune it

# in a fresh interpreter: mmapped blocks (glibc's mallinfo2().hblks) while an 8 MB buffer is held, after the setting
PROBE = """
import ctypes, sys
from modelship import allocator

class Info(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
applied = allocator.keep_freed_memory() if sys.argv[1] == "set" else None
before = libc.mallinfo2().hblks
buffer = bytearray(8 << 20)
print(applied, libc.mallinfo2().hblks - before)
"""


def python(code: str, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """What `code` prints, run in a fresh interpreter (whose malloc nothing has tuned yet), split into words."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                         env={**ENV, **(env or {})}, check=True)  # fmt: skip
    return out.stdout.split()


def test_a_request_sized_buffer_is_mapped_by_default_and_on_the_heap_once_set() -> None:
    assert python(PROBE, "default") == ["None", "1"]  # glibc as it starts: a fresh mmap, unmapped on free
    assert python(PROBE, "set") == ["True", "0"]


def test_malloc_settings_in_glibc_tunables_are_left_to_the_operator() -> None:
    tunables = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}
    assert python(PROBE, "set", env=tunables) == ["False", "1"]


def test_give_back_returns_the_freed_heap_that_the_setting_keeps() -> None:
    code = """
import ctypes
from modelship import allocator

def resident() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * 4096

assert allocator.keep_freed_memory()
buffers = [bytearray(1 << 20) for _ in range(200)]  # a model's weights: 200 MB in 1 MB tensors
held = resident()
del buffers
kept = resident()
allocator.give_back()
print(round((held - kept) / 2**20), round((held - resident()) / 2**20))
"""
    freed_kept, freed_given = map(int, python(code))
    assert freed_kept < 20  # under the trim threshold: freed, yet still resident
    assert freed_given > 180  # given back to the system
