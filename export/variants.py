"""Deployment variants of the ONNX file, and their gate.

- `onnx-fp16`: weights and compute in half precision, float32 inputs and outputs; ops that must stay float32 (ONNX
  Runtime's block list, plus Resize) stay float32, and the Cast pairs the converter leaves between them are folded
  (onnxconverter-common#306, onnxruntime#20346).
- `onnx-int8`: static quantization in QDQ format (not QOperator: onnxruntime#12072), per-channel int8 weights and
  uint8 activations, after ONNX Runtime's `quant_pre_process`, calibrated on real images through the eval
  preprocessing.

Variants are not meant to be exact, so their gate is not atol: top-1 agreement with eager fp32 on real labelled
images, and the accuracy drop on those images, each against a threshold. Depthwise convolutions quantized per
channel have collapsed before (onnxruntime#11415): the gate is what catches such a model, by name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelship.devices import cpu_flags
from modelship.errors import ConfigError, DataError, ExportError
from modelship.export.config import ExportOptions
from modelship.export.formats import quiet
from modelship.export.parity import Runner
from modelship.export.source import Source
from modelship.imagefolder import class_name, eval_split, folder_images, open_image, scan_folder
from modelship.preprocess import preprocess_image
from modelship.training.data import source_samples

log = logging.getLogger(__name__)

GATE_IMAGES = 1000  # labelled validation images the gate runs on, evenly spread over the split
FP16_KEEP_FLOAT32 = ("Resize",)  # besides ONNX Runtime's own block list: interpolation drifts in half precision
CALIBRATION_BATCH = 32


# ------------------------------------------------------------------------------------------------ images


@dataclass
class Labelled:
    """Real images through the eval preprocessing, with their labels, and where they came from."""

    x: np.ndarray  # float32 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    source: str


def gate_images(src: Source, opts: ExportOptions) -> Labelled:
    """The labelled images variants are gated on: --validation-data, else the checkpoint's validation split."""
    if opts.validation_data is not None:
        root = eval_split(opts.validation_data)
        classes, files = scan_folder(root, "--validation-data")
        known = [class_name(c) for c in src.classes]
        unknown = sorted(set(classes) - set(known))
        if unknown:
            raise DataError(
                f"--validation-data {root} has class folders {unknown} the model does not know ({src.classes})"
            )
        files = files[:: max(1, len(files) // GATE_IMAGES)][:GATE_IMAGES]
        pairs = [(open_image(p), known.index(classes[label])) for p, label in files]
        where = f"--validation-data {root}"
    else:
        pairs = source_samples(src.data, "val", GATE_IMAGES) if src.data else []
        where = "the checkpoint's validation split"
    if not pairs:
        raise ConfigError(
            "--variants are gated on labelled validation images, and the checkpoint's data is not on disk (or this is "
            "a bare state_dict); pass --validation-data PATH, a folder with one sub-folder of images per class"
        )
    x = np.stack([preprocess_image(image, src.preprocess) for image, _ in pairs])
    return Labelled(x, np.asarray([label for _, label in pairs], np.int64), f"{where} ({len(pairs)} images)")


def calibration_images(src: Source, opts: ExportOptions) -> tuple[np.ndarray, str]:
    """int8 calibration batch: --calibration-data, else a seeded sample of the checkpoint's training split."""
    n = opts.calibration_size
    if opts.calibration_data is not None:
        files = folder_images(opts.calibration_data, "--calibration-data")
        picked = [files[i] for i in sorted(np.random.default_rng(opts.seed).permutation(len(files))[:n])]
        images = [open_image(p) for p in picked]  # any mode: preprocessing converts it, as serving does
        where = f"--calibration-data {opts.calibration_data}"
    elif src.data:
        images = [image for image, _ in source_samples(src.data, "train", n, opts.seed)]
        where = "the checkpoint's training split"
    else:
        images = []
        where = ""
    if not images:
        raise ConfigError(
            "int8 needs real images to calibrate on, and the checkpoint's training data is not on disk (or this is a "
            "bare state_dict); pass --calibration-data PATH, a folder of images like the ones the model will see"
        )
    return np.stack([preprocess_image(image, src.preprocess) for image in images]), f"{where} ({len(images)} images)"


# ------------------------------------------------------------------------------------------------ fp16


def make_fp16(src_path: Path, out_path: Path) -> dict[str, Any]:
    """Half-precision weights and compute; float32 inputs and outputs; the block list kept in float32."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src_path))
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FLOAT32))
    try:
        with quiet(True):
            half = convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    except Exception as e:
        raise ExportError(f"fp16 conversion failed: {str(e).splitlines()[0]}") from None
    folded = fold_cast_pairs(half)
    topological_sort(half.graph)  # the converter appends its input Casts at the end; the checker wants order
    del half.graph.value_info[:]  # intermediate types the converter left stale around kept ops; ORT re-infers them
    try:
        onnx.checker.check_model(half, full_check=True)
    except Exception as e:
        raise ExportError(f"the fp16 model fails onnx.checker: {str(e).splitlines()[0]}") from None
    onnx.save(half, str(out_path))
    kept = sorted({n.op_type for n in model.graph.node} & set(block))
    return {"precision": "fp16", "io": "float32", "kept_float32": kept, "casts_folded": folded}


def fold_cast_pairs(model: Any) -> int:
    """Remove Cast(a->b) -> Cast(b->a) chains (the converter leaves them between float32 islands); return how many."""
    graph = model.graph
    producers = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    graph_outputs = {o.name for o in graph.output}
    dtype_of = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.input, *graph.value_info, *graph.output]}
    removed = []
    for second in graph.node:
        first = producers.get(second.input[0]) if second.op_type == "Cast" and second.input else None
        if first is None or first.op_type != "Cast" or len(consumers.get(first.output[0], [])) != 1:
            continue
        if second.output[0] in graph_outputs or first in removed:
            continue
        to = next(a.i for a in second.attribute if a.name == "to")
        if dtype_of.get(first.input[0]) != to:
            continue  # not a round trip back to the original type
        for n in consumers.get(second.output[0], []):
            n.input[:] = [first.input[0] if i == second.output[0] else i for i in n.input]
        removed += [first, second]
    for n in removed:
        graph.node.remove(n)
    return len(removed) // 2


def topological_sort(graph: Any) -> None:
    """Order `graph.node` so every node comes after the producers of its inputs (Kahn's algorithm, stable)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError("the fp16 graph has a cycle or a dangling input; cannot order it")
        for n in ready:
            available.update(n.output)
        ordered += ready
        pending = [n for n in pending if n not in ready]
    copies = [type(n)() for n in ordered]
    for copy, n in zip(copies, ordered, strict=True):
        copy.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


# ------------------------------------------------------------------------------------------------ int8


class _Batches:
    """ONNX Runtime's CalibrationDataReader over equal-sized batches (its histogram collectors need equal shapes)."""

    def __init__(self, x: np.ndarray, input_name: str):
        n = max(1, min(CALIBRATION_BATCH, len(x)))
        pad = (-len(x)) % n
        x = np.concatenate([x, x[:pad]]) if pad else x
        self.it: Iterator[dict[str, np.ndarray]] = iter({input_name: x[i : i + n]} for i in range(0, len(x), n))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)


def make_int8(src_path: Path, out_path: Path, calibration: np.ndarray, method: str, verbose: bool) -> dict[str, Any]:
    """Static QDQ quantization, per-channel weights, calibrated on `calibration`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}  # fmt: skip
    prepared = out_path.with_name(out_path.name + ".pre")
    try:
        with quiet(not verbose):
            quant_pre_process(str(src_path), str(prepared))
            reader = _Batches(calibration, "input")
            quantize_static(
                str(prepared), str(out_path), reader,
                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=methods[method],
            )  # fmt: skip
    except Exception as e:
        raise ExportError(f"int8 quantization failed: {str(e).strip().splitlines()[-1][:300]}") from None
    finally:
        prepared.unlink(missing_ok=True)
        for leftover in out_path.parent.glob("augmented_model*.onnx"):
            leftover.unlink()
    features = cpu_int8_features()
    if not any(features.values()):
        log.warning(
            "this CPU has no VNNI or AMX: int8 may run slower than fp32 here (onnxruntime#5319); "
            "see the speedup in parity.json and benchmarks/export_bench.py"
        )
    return {"precision": "int8", "io": "float32", "format": "QDQ", "per_channel": True,
            "calibration": {"method": method, "images": len(calibration)}, "cpu_int8": features}  # fmt: skip


def cpu_int8_features() -> dict[str, bool]:
    """The x86 instructions that make int8 fast on a CPU (all False where the flags cannot be read)."""
    flags = cpu_flags()
    return {f: f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8")}


# ------------------------------------------------------------------------------------------------ the gate


@dataclass
class VariantCheck:
    artifact: str
    runtime: str
    images: int
    top1_agreement: float
    min_agreement: float
    accuracy: float
    reference_accuracy: float
    accuracy_drop: float
    max_accuracy_drop: float
    speedup: float  # fp32 ONNX seconds / this variant's seconds on the same runtime and images
    passed: bool

    def describe(self) -> str:
        why = []
        if self.top1_agreement < self.min_agreement:
            why.append(f"top-1 agreement {self.top1_agreement:.4f} < {self.min_agreement:g}")
        if self.accuracy_drop > self.max_accuracy_drop:
            why.append(f"accuracy drop {self.accuracy_drop:.4f} > {self.max_accuracy_drop:g}")
        return f"{self.artifact} on {self.runtime} ({self.images} labelled images): {', '.join(why) or 'passed'}"


def _timed(run: Runner, x: np.ndarray, chunk: int) -> tuple[np.ndarray, float]:
    run(x[:chunk])  # warm up: first calls allocate and pick kernels
    t0 = time.perf_counter()
    out = np.concatenate([run(x[i : i + chunk]) for i in range(0, len(x), chunk)])
    return out, time.perf_counter() - t0


def check_variants(
    reference: Runner, runners: list[tuple[str, str, Runner]], images: Labelled, opts: ExportOptions
) -> list[VariantCheck]:
    """Each variant on each runtime against eager fp32: top-1 agreement and accuracy drop on the labelled images."""
    chunk = opts.max_batch
    ref, _ = _timed(reference, images.x, chunk)
    ref_top1 = ref.argmax(1)
    ref_acc = float((ref_top1 == images.labels).mean())
    fp32_seconds = {rt: _timed(run, images.x, chunk)[1] for kind, rt, run in runners if kind == "onnx"}
    checks = []
    for kind, runtime, run in runners:
        if kind not in ("onnx-fp16", "onnx-int8"):
            continue
        out, seconds = _timed(run, images.x, chunk)
        top1 = out.argmax(1) if np.isfinite(out).all() else np.full(len(out), -1)
        acc = float((top1 == images.labels).mean())
        variant = kind.removeprefix("onnx-")
        agreement = float((top1 == ref_top1).mean())
        drop = round(ref_acc - acc, 6)
        min_agreement = opts.min_agreement(variant)
        checks.append(
            VariantCheck(
                kind, runtime, len(images.x), agreement, min_agreement, acc, ref_acc, drop, opts.max_accuracy_drop,
                round(fp32_seconds.get(runtime, seconds) / max(seconds, 1e-9), 3),
                agreement >= min_agreement and drop <= opts.max_accuracy_drop,
            )
        )  # fmt: skip
    return checks


def report(checks: list[VariantCheck]) -> list[dict[str, Any]]:
    return [asdict(c) for c in checks]


def table(checks: list[VariantCheck]) -> str:
    """The variants' gate for the terminal."""
    head = (
        "variant",
        "runtime",
        "images",
        "top1_agree",
        "min",
        "accuracy",
        "fp32",
        "drop",
        "max_drop",
        "speedup",
        "ok",
    )
    rows = [
        (c.artifact, c.runtime, str(c.images), f"{c.top1_agreement:.4f}", f"{c.min_agreement:g}", f"{c.accuracy:.4f}",
         f"{c.reference_accuracy:.4f}", f"{c.accuracy_drop:+.4f}", f"{c.max_accuracy_drop:g}", f"{c.speedup:.2f}x",
         "PASS" if c.passed else "FAIL")
        for c in checks
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows])
