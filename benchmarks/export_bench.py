"""ONNX Runtime against eager PyTorch on the exported models, side by side in one run.

    python benchmarks/export_bench.py [--checkpoint runs/quickstart/checkpoints/best.pt] [--device cpu|cuda]

Exports the shapes cnn (from --checkpoint, or freshly initialised at 3x32x32) and resnet18 (3x224x224) with
`modelship export`, prints each parity table and export time, then measures samples/s of eager PyTorch and of ONNX
Runtime at batch 1 and 32. Measurements alternate between the two runtimes over several rounds and the median is
reported, so drift in a shared machine's speed hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelship.export.bundle import export
from modelship.export.config import ExportConfig, ExportOptions
from modelship.export.parity import table
from modelship.export.source import load_source
from modelship.training.models import build_model, model_kwargs


def samples_per_s(run: Callable[[], object], batch: int, min_seconds: float) -> float:
    for _ in range(3):
        run()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds or n < 3:
        run()
        n += 1
    return n * batch / elapsed


def ort_session(path: Path, device: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the server runs it
    providers: list = ["CPUExecutionProvider"]
    if device == "cuda":
        ort.preload_dlls()
        providers = [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


def compare(
    model: torch.nn.Module, session: Any, x: np.ndarray, device: torch.device, args: argparse.Namespace
) -> tuple[float, float]:
    """Median samples/s of eager PyTorch and of ONNX Runtime on batch `x`, measured alternately."""
    xt = torch.from_numpy(x).to(device)

    def eager() -> object:
        with torch.inference_mode():
            out = model(xt)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    def onnxruntime() -> object:
        return session.run(None, {"input": x})

    e, o = [], []
    for _ in range(args.rounds):
        e.append(samples_per_s(eager, len(x), args.seconds))
        o.append(samples_per_s(onnxruntime, len(x), args.seconds))
    return statistics.median(e), statistics.median(o)


def models_to_export(args: argparse.Namespace, tmp: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """(name, checkpoint, bare state_dict flags) for the cnn and resnet18."""
    torch.manual_seed(0)
    out: list[tuple[str, Path, dict[str, Any]]] = []
    if args.checkpoint:
        out.append(("cnn", args.checkpoint, {}))
    else:
        torch.save(build_model("cnn", model_kwargs("cnn", 5, [3, 32, 32], {})).state_dict(), tmp / "cnn.pt")
        out.append(("cnn", tmp / "cnn.pt", {"model": "cnn", "input_shape": (3, 32, 32)}))
    torch.save(
        build_model("resnet18", model_kwargs("resnet18", 10, [3, 224, 224], {})).state_dict(), tmp / "resnet18.pt"
    )
    out.append(("resnet18", tmp / "resnet18.pt", {"model": "resnet18", "input_shape": (3, 224, 224)}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="the shapes cnn checkpoint (default: random weights)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ckpt, bare in models_to_export(args, Path(tmp)):
            t0 = time.perf_counter()
            bundle = export(ExportConfig(ckpt, Path(tmp) / name, ExportOptions(device=args.device), **bare))
            seconds = time.perf_counter() - t0
            each = ", ".join(f"{k} {v['export_seconds']}s" for k, v in bundle.manifest["artifacts"].items())
            print(f"\n{name}: export and parity in {seconds:.1f}s ({each})")
            print(table(bundle.checks))
            src = load_source(ckpt, bare)
            model = src.model.to(device).eval()
            session = ort_session(bundle.path / "model.onnx", args.device)
            for batch in (int(b) for b in args.batches.split(",")):
                x = np.random.default_rng(0).standard_normal((batch, *src.input_shape)).astype(np.float32)
                e, o = compare(model, session, x, device, args)
                results.append({"model": name, "input": src.input_shape, "batch": batch, "eager": e, "onnxruntime": o})

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    print(f"device {args.device}, torch threads {torch.get_num_threads()}; samples/s, median of {args.rounds} rounds\n")
    print(f"{'model':<10} {'input':<14} {'batch':>5}  {'eager':>10}  {'onnxruntime':>11}  ort/eager")
    for r in results:
        shape = str(r["input"])
        ratio = r["onnxruntime"] / r["eager"]
        cells = f"{r['model']:<10} {shape:<14} {r['batch']:>5}  {r['eager']:>10.1f}  {r['onnxruntime']:>11.1f}"
        print(f"{cells}  {ratio:>8.2f}x")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
