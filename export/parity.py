"""Parity: eager PyTorch against every exported artifact, with numbers per artifact, runtime, inputs and batch size.

A check passes when every output element satisfies |got - ref| <= atol + rtol * |ref| (numpy.allclose) and no
top-1 prediction flips. A flip is a changed argmax where the eager top-2 margin exceeds that same tolerance: a
near-tie that swaps within the tolerance is not a flip.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelship.backends import opening
from modelship.errors import ConfigError
from modelship.preprocess import Preprocess, preprocess_image

log = logging.getLogger(__name__)

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class Check:
    artifact: str
    runtime: str
    inputs: str
    batch_size: int
    max_abs_err: float
    mean_abs_err: float
    max_rel_err: float
    top1_agreement: float
    flips: int
    atol: float
    rtol: float
    passed: bool

    def describe(self) -> str:
        why = f"max_abs_err {self.max_abs_err:.3g} (atol {self.atol:g}, rtol {self.rtol:g})"
        if self.flips:
            why += f", {self.flips} top-1 flip{'s' if self.flips > 1 else ''}"
        return f"{self.artifact} on {self.runtime} at batch {self.batch_size} ({self.inputs} inputs): {why}"


def compare(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    """The numbers of one check; NaN or a shape mismatch fails it."""
    if got.shape != ref.shape:
        return {
            "max_abs_err": float("inf"),
            "mean_abs_err": float("inf"),
            "max_rel_err": float("inf"),
            "top1_agreement": 0.0,
            "flips": len(ref),
            "passed": False,
        }
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    diff = np.abs(got64 - ref64)
    finite = bool(np.isfinite(got64).all())
    scale = np.abs(ref64)
    rel = diff / np.maximum(scale, 1e-12)
    agree = ref.argmax(1) == got.argmax(1)
    top2 = np.sort(ref64, axis=1)[:, -2:] if ref.shape[1] > 1 else np.concatenate([ref64, ref64], axis=1)
    margin = top2[:, 1] - top2[:, 0]
    tolerance = atol + rtol * np.abs(top2[:, 1])
    flips = int(np.sum(~agree & (margin > tolerance)))
    within = bool(np.all(diff <= atol + rtol * scale)) and finite
    return {
        "max_abs_err": float(diff.max()) if finite else float("inf"),
        "mean_abs_err": float(diff.mean()) if finite else float("inf"),
        # relative error where the reference is not tiny: near zero it says nothing
        "max_rel_err": float(rel[scale > atol].max()) if finite and (scale > atol).any() else 0.0,
        "top1_agreement": float(agree.mean()),
        "flips": flips,
        "passed": within and flips == 0,
    }


def parity_inputs(
    input_shape: list[int], batch_sizes: list[int], seed: int, real: list[Any], pre: Preprocess
) -> list[tuple[str, np.ndarray]]:
    """(kind, batch) pairs: seeded standard-normal batches, and real validation images when there are some."""
    rng = np.random.default_rng(seed)
    out = [("random", rng.standard_normal((b, *input_shape)).astype(np.float32)) for b in batch_sizes]
    if real:
        images = np.stack([preprocess_image(im, pre) for im in real])
        for b in batch_sizes:
            idx = np.arange(b) % len(images)
            out.append(("real", np.ascontiguousarray(images[idx])))
    return out


def eager_runner(model: nn.Module) -> Runner:
    model = model.eval().cpu()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return run


def torchscript_runner(path: Path) -> Runner:
    with warnings.catch_warnings(), opening("torchscript", path):
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def pt2_runner(path: Path) -> Runner:
    with opening("pt2", path):
        module = torch.export.load(str(path)).module()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def cuda_usable() -> bool:
    """ONNX Runtime's CUDA provider is worth trying: torch sees a GPU and ORT was built with the provider."""
    import onnxruntime as ort

    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


def onnx_runner(path: Path, provider: str, kind: str = "onnx") -> Runner | None:
    """An ONNX Runtime session on `provider`; None when that provider does not really load."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if provider == "CUDAExecutionProvider":
        # TF32 would make CUDA disagree with fp32 eager by ~1e-3; parity compares true fp32
        providers: list[Any] = [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    with opening(kind, path):
        session = ort.InferenceSession(str(path), options, providers=providers)
    if session.get_providers()[0] != provider:
        log.warning("ONNX Runtime could not load %s here; skipping that parity run", provider)
        return None
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return run


def runners_for(artifacts: dict[str, Path], device: str) -> list[tuple[str, str, Runner]]:
    """(artifact, runtime, runner) for every artifact and runtime to check: torch ones on CPU (eager is the reference
    there), every ONNX file on ONNX Runtime's CPU provider, and on its CUDA provider when a GPU is usable."""
    out: list[tuple[str, str, Runner]] = []
    if "torchscript" in artifacts:
        out.append(("torchscript", "torch-cpu", torchscript_runner(artifacts["torchscript"])))
    if "pt2" in artifacts:
        out.append(("pt2", "torch-cpu", pt2_runner(artifacts["pt2"])))
    onnx_files = {k: v for k, v in artifacts.items() if k.startswith("onnx")}
    on_gpu = device == "cuda" or (device == "auto" and onnx_files and cuda_usable())
    for kind, path in onnx_files.items():
        cpu = onnx_runner(path, "CPUExecutionProvider", kind)
        assert cpu is not None
        out.append((kind, "onnxruntime-cpu", cpu))
        if on_gpu:
            cuda = onnx_runner(path, "CUDAExecutionProvider", kind)
            if cuda is not None:
                out.append((kind, "onnxruntime-cuda", cuda))
            elif device == "cuda":
                raise ConfigError("--device cuda: ONNX Runtime's CUDA provider is not usable here")
    return out


def check_parity(
    reference: Runner,
    runners: list[tuple[str, str, Runner]],
    inputs: list[tuple[str, np.ndarray]],
    atol: float,
    rtol: float,
) -> list[Check]:
    checks = []
    for kind, x in inputs:
        ref = reference(x)
        for artifact, runtime, run in runners:
            try:
                got = run(x)
            except Exception as e:  # an artifact that crashes at some batch size fails that check
                log.error("%s on %s failed at batch %d: %s", artifact, runtime, len(x), str(e).splitlines()[0])
                got = np.full((0,), np.nan, dtype=np.float32)
            numbers = compare(ref, got, atol, rtol)
            checks.append(Check(artifact, runtime, kind, len(x), atol=atol, rtol=rtol, **numbers))
    return checks


def summary(checks: list[Check]) -> dict[str, Any]:
    """The manifest's `parity` block."""
    return {
        "passed": all(c.passed for c in checks),
        "max_abs_err": max(c.max_abs_err for c in checks),
        "max_rel_err": max(c.max_rel_err for c in checks),
        "min_top1_agreement": min(c.top1_agreement for c in checks),
        "checks": len(checks),
        "failed": [c.describe() for c in checks if not c.passed],
    }


def report(checks: list[Check]) -> list[dict[str, Any]]:
    return [asdict(c) for c in checks]


def table(checks: list[Check]) -> str:
    """A readable table for the terminal."""
    head = ("artifact", "runtime", "inputs", "batch", "max_abs", "mean_abs", "max_rel", "top1", "tol", "ok")
    rows = [
        (
            c.artifact,
            c.runtime,
            c.inputs,
            str(c.batch_size),
            f"{c.max_abs_err:.2e}",
            f"{c.mean_abs_err:.2e}",
            f"{c.max_rel_err:.2e}",
            f"{c.top1_agreement:.3f}",
            f"{c.atol:g}+{c.rtol:g}|ref|",
            "PASS" if c.passed else "FAIL",
        )
        for c in checks
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    return "\n".join(lines)
