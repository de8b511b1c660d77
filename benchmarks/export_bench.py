"""Exported forms side by side: eager PyTorch, ONNX Runtime fp32, fp16 and int8 — throughput, size and accuracy.

    python benchmarks/export_bench.py --checkpoint cnn=runs/quickstart/checkpoints/best.pt \\
        --checkpoint resnet18=runs/resnet224/checkpoints/best.pt [--device cpu|cuda] [--methods minmax,percentile]

Each checkpoint is exported with `--variants fp16,int8` (int8 once per calibration method), so the accuracy of
every variant and its top-1 agreement with eager fp32 come from the export's own gate, on the checkpoint's
labelled validation split. Throughput is measured at each batch size with the contenders alternating over several
rounds (the median is reported), so drift in a shared machine's speed hits all alike.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from modelship.export.variants import cpu_int8_features
from modelship.export.variants import table as variants_table


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
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


def contenders(bundle: Path, model: torch.nn.Module, device: torch.device) -> dict[str, Callable[[np.ndarray], Any]]:
    """name -> run(x) for eager and every ONNX file of the bundle."""
    manifest = json.loads((bundle / "manifest.json").read_text())

    def eager(x: np.ndarray) -> object:
        with torch.inference_mode():
            out = model(torch.from_numpy(x).to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    runs: dict[str, Callable[[np.ndarray], Any]] = {"eager": eager}
    for kind, art in manifest["artifacts"].items():
        if kind.startswith("onnx"):
            session = ort_session(bundle / art["path"], device.type)
            runs[kind] = lambda x, s=session: s.run(None, {"input": x})
    return runs


def throughput(runs: dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, args: argparse.Namespace) -> dict:
    """Median samples/s per contender, measured alternately over the rounds."""
    got: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            got[name].append(samples_per_s(lambda r=run: r(x), len(x), args.seconds))
    return {k: statistics.median(v) for k, v in got.items()}


def export_all(name: str, ckpt: Path, tmp: Path, args: argparse.Namespace) -> tuple[Path, list[tuple[str, Any]]]:
    """The bundle with fp16 and int8 (the first method), then int8 with each other method; (label, gate) pairs."""
    first, *others = args.methods.split(",")
    base = ExportOptions(formats=("onnx",), variants=("fp16", "int8"), device=args.device, calibration_method=first)
    t0 = time.perf_counter()
    bundle = export(ExportConfig(ckpt, tmp / name, base))
    print(f"\n{name}: export and checks in {time.perf_counter() - t0:.1f}s")
    print(table(bundle.checks))
    print(variants_table(bundle.variant_checks))
    label = {"onnx-fp16": "onnx-fp16", "onnx-int8": f"onnx-int8 {first}"}
    gates = [(label[v.artifact], v) for v in bundle.variant_checks]
    for method in others:
        options = dataclasses.replace(base, variants=("int8",), calibration_method=method)
        other = export(ExportConfig(ckpt, tmp / f"{name}-{method}", options))
        print(variants_table(other.variant_checks))
        gates += [(f"onnx-int8 {method}", v) for v in other.variant_checks]
    return bundle.path, gates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        metavar="NAME=CKPT",
        help="a trained checkpoint whose data is on disk (repeatable)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--methods", default="minmax,percentile,entropy", help="int8 calibration methods to compare")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()  # fmt: skip
    device = torch.device(args.device)
    results, accuracy = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.checkpoint:
            name, _, path = spec.partition("=")
            bundle, gates = export_all(name, Path(path), Path(tmp), args)
            manifest = json.loads((bundle / "manifest.json").read_text())
            sizes = {k: a["bytes"] for k, a in manifest["artifacts"].items()}
            for key, v in gates:
                accuracy.append({"model": name, "variant": key, "fp32": v.reference_accuracy, "accuracy": v.accuracy,
                                 "drop": v.accuracy_drop, "agreement": v.top1_agreement, "images": v.images,
                                 "bytes": sizes[v.artifact], "fp32_bytes": sizes["onnx"]})  # fmt: skip
            src = load_source(Path(path), {})
            runs = contenders(bundle, src.model.to(device).eval(), device)
            for batch in (int(b) for b in args.batches.split(",")):
                x = np.random.default_rng(0).standard_normal((batch, *src.input_shape)).astype(np.float32)
                results.append({"model": name, "input": src.input_shape, "batch": batch, **throughput(runs, x, args)})
    report(results, accuracy, args)


def report(results: list[dict], accuracy: list[dict], args: argparse.Namespace) -> None:
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; int8 instructions: "
          f"{', '.join(k for k, v in cpu_int8_features().items() if v) or 'none (no VNNI/AMX)'}")  # fmt: skip
    print(f"device {args.device}, torch threads {torch.get_num_threads()}; samples/s, median of {args.rounds} rounds\n")
    print(f"{'model':<9} {'input':<14} {'batch':>5} {'eager':>9} {'ort fp32':>9} {'ort fp16':>9} {'ort int8':>9}"
          "  fp32/eager  fp16/fp32  int8/fp32")  # fmt: skip
    for r in results:
        print(f"{r['model']:<9} {r['input']!s:<14} {r['batch']:>5} {r['eager']:>9.1f} {r['onnx']:>9.1f} "
              f"{r['onnx-fp16']:>9.1f} {r['onnx-int8']:>9.1f}  {r['onnx'] / r['eager']:>9.2f}x "
              f"{r['onnx-fp16'] / r['onnx']:>9.2f}x {r['onnx-int8'] / r['onnx']:>9.2f}x")  # fmt: skip
    print(f"\n{'model':<9} {'variant':<20} {'size':>8} {'of fp32':>8} {'fp32 acc':>9} {'acc':>7} {'drop':>8} "
          f"{'agreement':>10}  images")  # fmt: skip
    for a in accuracy:
        size = f"{a['bytes'] / 1024:>6.0f}KB {a['bytes'] / a['fp32_bytes']:>7.0%}"
        print(f"{a['model']:<9} {a['variant']:<20} {size} {a['fp32']:>9.4f} {a['accuracy']:>7.4f} {a['drop']:>+8.4f} "
              f"{a['agreement']:>10.4f}  {a['images']}")  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps({"throughput": results, "accuracy": accuracy}, indent=2) + "\n")


if __name__ == "__main__":
    main()
