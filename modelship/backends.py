"""Inference backends over a bundle's artifacts: ONNX Runtime for every ONNX file (fp32, fp16, int8; no torch
import), and torch for TorchScript and torch.export programs.

A backend is a callable float32 [N, C, H, W] -> float32 [N, num_classes] plus a description for /info. A file its
runtime cannot open is one ArtifactError line (`opening`), wherever it is opened: the server, `predict`, `evaluate`,
export's parity and `verify`, `triton`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelship.devices import tensorrt_loadable
from modelship.errors import ArtifactError

log = logging.getLogger(__name__)


@dataclass
class Backend:
    run: Callable[[np.ndarray], np.ndarray]
    kind: str  # an artifact kind: onnx, onnx-fp16, onnx-int8, torchscript, pt2
    device: str  # cpu | cuda:N
    providers: list[str]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)


def device_index(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0


def onnx_backend(path: Path, device: str, threads: int, kind: str = "onnx") -> Backend:
    """An ONNX Runtime session: TensorRT/CUDA providers on a GPU (with CPU as fallback), the CPU provider otherwise.
    TensorRT runs the fp16 and int8 (QDQ) files in their own precision."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # spinning intra-op threads burn a core between batches that the API server needs on a small machine
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list[str | tuple[str, dict[str, object]]] = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        idx = device_index(device)
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels torch brought along
        providers = [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]
        if os.environ.get("MODELSHIP_TENSORRT", "1") != "0" and tensorrt_loadable():
            trt: dict[str, object] = {"device_id": idx, "trt_fp16_enable": kind == "onnx-fp16"}
            if kind == "onnx-int8":
                trt["trt_int8_enable"] = True  # explicit quantization: the scales come from the QDQ nodes
            providers.insert(0, ("TensorrtExecutionProvider", trt))
    session = ort.InferenceSession(str(path), options, providers=providers)
    active = session.get_providers()
    if device.startswith("cuda") and active[0] == "CPUExecutionProvider":
        log.warning("ONNX Runtime could not load its CUDA provider; serving on CPU")
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return Backend(run, kind, device, active)


def torchscript_backend(path: Path, device: str, threads: int) -> Backend:
    """A TorchScript module on `device`, run under inference_mode."""
    import torch

    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit's deprecation notice
        module = torch.jit.load(str(path), map_location=device).eval()
    dev = torch.device(device)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x).to(dev, non_blocking=True)).float().cpu().numpy()

    return Backend(run, "torchscript", device, [f"torch-{dev.type}"])


def pt2_backend(path: Path, device: str, threads: int) -> Backend:
    """A torch.export program (torch.export.load(...).module()) on `device`, run under inference_mode."""
    import torch

    torch.set_num_threads(threads)
    dev = torch.device(device)
    module = torch.export.load(str(path)).module().to(dev)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x).to(dev, non_blocking=True)).float().cpu().numpy()

    return Backend(run, "pt2", device, [f"torch-{dev.type}"])


def load_backend(kind: str, path: Path, device: str, threads: int) -> Backend:
    """The backend that runs artifact `kind` of a bundle; ArtifactError when its runtime cannot open the file."""
    with opening(kind, path):
        if kind.startswith("onnx"):
            return onnx_backend(path, device, threads, kind)
        return {"torchscript": torchscript_backend, "pt2": pt2_backend}[kind](path, device, threads)


RUNTIMES = {"onnx": "ONNX Runtime", "torchscript": "torch.jit.load", "pt2": "torch.export.load"}
FILE_KINDS = {"onnx": "an ONNX file", "torchscript": "a TorchScript file", "pt2": "a torch.export program"}
# what each runtime says when the bytes are not a file of its kind at all (protobuf, zip and pickle readers)
NOT_A_FILE = ("INVALID_PROTOBUF", "PytorchStreamReader", "zip archive", "not a zip file", "invalid load key")


@contextlib.contextmanager
def opening(kind: str, path: Path) -> Iterator[None]:
    """Turn a runtime's failure to open artifact `kind` at `path` into one ArtifactError line: which file, what is
    wrong (not a file of its kind, or refused by the runtime), and the runtime's own first line. A bundle that cannot
    be loaded is a user's problem to fix (re-export it), not a crash."""
    try:
        yield
    except ArtifactError:
        raise
    except Exception as e:
        detail = refusal(kind, path, e)
        raise ArtifactError(f"bundle {path.parent}: {detail}", detail) from e


def refusal(kind: str, path: Path, e: BaseException) -> str:
    """'onnx artifact model.onnx: not an ONNX file (ONNX Runtime: ...)', naming no folder."""
    family = "onnx" if kind.startswith("onnx") else kind
    runtime = RUNTIMES.get(family, family)
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    first = first.replace(str(path.resolve()), path.name).replace(str(path), path.name)[:300]
    not_a_file = any(s in first for s in NOT_A_FILE)
    what = f"not {FILE_KINDS.get(family, 'a file of its kind')}" if not_a_file else f"{runtime} refused it"
    return f"{kind} artifact {path.name}: {what} ({runtime}: {first})"


# the v2 model metadata's `platform` for each artifact kind (Triton's names where Triton has one)
PLATFORMS = {
    "onnx": "onnxruntime_onnx", "onnx-fp16": "onnxruntime_onnx", "onnx-int8": "onnxruntime_onnx",
    "torchscript": "pytorch_libtorch", "pt2": "pytorch_torch_export",
}  # fmt: skip
