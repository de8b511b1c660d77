"""Device names and GPU discovery without torch: the CLI, export and serving all ask the same way."""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

from modelship.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


@lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """GPUs the CUDA driver reports, asked through libcuda directly: no torch, no ONNX Runtime error spew."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def usable_gpus(requested: str) -> int:
    """How many GPUs to run on for --device `requested` (auto|cpu|cuda): all usable ones unless cpu; ConfigError for
    cuda on a machine without a usable one."""
    gpus = cuda_device_count()
    if requested == "cuda" and gpus == 0:
        raise ConfigError("--device cuda but no CUDA device is usable here; use --device cpu or auto")
    return 0 if requested == "cpu" else gpus


def tensorrt_loadable() -> bool:
    """TensorRT's runtime library loads here (ONNX Runtime's TensorRT provider needs it)."""
    for name in ("libnvinfer.so.10", "libnvinfer.so.8"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False
