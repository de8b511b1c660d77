"""The export stage: `export(cfg) -> Bundle` and `verify(...)`.

The bundle is built in a temporary directory and renamed into place, so a failed export leaves nothing behind.
Every artifact is checked before the manifest is written: exact formats (onnx, torchscript, pt2) by atol/rtol
against eager PyTorch, variants (onnx-fp16, onnx-int8) by top-1 agreement and accuracy on labelled images.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelship import reference
from modelship.errors import BundleError, CheckpointError, ConfigError, ParityError
from modelship.export import parity, variants
from modelship.export.config import ExportConfig, ExportOptions
from modelship.export.formats import INPUT_NAME, OUTPUT_NAME, export_onnx, export_pt2, export_torchscript
from modelship.export.reference import write_reference
from modelship.export.source import Source, load_source
from modelship.files import sha256_file, write_json
from modelship.manifest import (
    ARTIFACT_FILES,
    FORMAT,
    MANIFEST,
    PARITY,
    VARIANTS,
    VERSION,
    check_bundle,
)
from modelship.training.data import validation_images
from modelship.versions import versions

log = logging.getLogger(__name__)


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    checks: list[parity.Check]
    variant_checks: list[variants.VariantCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and all(c.passed for c in self.variant_checks)

    @property
    def failures(self) -> list[str]:
        """One line per failed check, exact formats first, then variants; [] when the bundle may ship."""
        return failed_checks(self.checks, self.variant_checks)

    def raise_if_failed(self) -> None:
        """ParityError naming every failed check: the bundle is written, but it must not ship."""
        raise_for(self.checks, self.variant_checks, [], f"bundle {self.path} written, but it must not ship")


def failed_checks(checks: list[Any], variant_checks: list[Any]) -> list[str]:
    """describe() of every check that failed, in order."""
    return [c.describe() for c in [*checks, *variant_checks] if not c.passed]


def raise_for(checks: list[Any], variant_checks: list[Any], problems: list[str], what: str) -> None:
    """One ParityError listing every failed check and every other problem (hash mismatches), if there are any."""
    problems = problems + failed_checks(checks, variant_checks)
    if problems:
        raise ParityError(f"{what}: {len(problems)} check(s) failed: " + "; ".join(problems))


def _staging_dir(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as e:
        raise ConfigError(f"cannot write the bundle to {out}: {e.strerror or e}") from None
    return tmp


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished bundle over `out`; an old bundle is moved aside first and deleted after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


Gated = tuple[list[parity.Check], list[variants.VariantCheck]]


def build_manifest(
    cfg: ExportConfig, src: Source, artifacts: dict[str, dict[str, Any]], gates: Gated
) -> dict[str, Any]:
    """The bundle's manifest.json (ARCHITECTURE.md lists its keys): written here and nowhere else."""
    c, h, w = src.input_shape
    opts = cfg.options
    checks, gated = gates
    every: list[parity.Check | variants.VariantCheck] = [*checks, *gated]
    failed = failed_checks(checks, gated)
    for kind, art in artifacts.items():
        art["checked_on"] = sorted({x.runtime for x in every if x.artifact == kind})
    return {
        "format": FORMAT,
        "version": VERSION,
        "name": cfg.bundle_name,
        "classes": src.classes,
        "model": {"arch": src.arch, "kwargs": src.kwargs},
        "input": {"name": INPUT_NAME, "shape": ["batch", c, h, w], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(src.classes)], "dtype": "float32"},
        "preprocess": src.preprocess.to_dict(),
        "max_batch": opts.max_batch,
        "artifacts": artifacts,
        "parity": {
            **parity.summary(checks),
            "passed": not failed,
            "failed": failed,
            "atol": opts.atol,
            "rtol": opts.rtol,
            "batch_sizes": opts.batch_sizes,
            "seed": opts.seed,
            "variants": [variant_summary(v) for v in gated],
            "variant_gate": {
                "max_accuracy_drop": opts.max_accuracy_drop,
                "min_agreement": {v: opts.min_agreement(v) for v in opts.variants},
            },
            "report": PARITY,
        },
        "gates": export_gates(checks, gated, opts),
        "passed": not failed,
        "source": src.info,
        "versions": versions("torch", "onnx", "onnxscript", "onnxruntime"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def export_gates(checks: list[parity.Check], gated: list[variants.VariantCheck], opts: ExportOptions) -> list[Gate]:
    """The manifest's `gates` from export: exact parity, then each variant's gate (a run adds its accuracy floor)."""
    tolerance = f"atol {opts.atol:g}, rtol {opts.rtol:g}"
    bad = [c.describe() for c in checks if not c.passed]
    worst = max((c.max_abs_err for c in checks), default=0.0)
    exact = "; ".join(bad) if bad else f"{len(checks)} checks within {tolerance}, worst max_abs_err {worst:.2e}"
    gates = [gate("parity", not bad, exact, checks=len(checks), failed=len(bad), max_abs_err=worst)]
    for v in gated:
        figures = (
            f"top-1 agreement {v.top1_agreement:.4f} (at least {v.min_agreement:g}), "
            f"accuracy drop {v.accuracy_drop:.4f} (at most {v.max_accuracy_drop:g})"
        )
        gates.append(
            gate(
                v.artifact,
                v.passed,
                f"{figures} on {v.runtime}, {v.images} labelled images",
                runtime=v.runtime,
                top1_agreement=v.top1_agreement,
                accuracy_drop=v.accuracy_drop,
            )
        )
    return gates


Gate = dict[str, Any]


def gate(name: str, passed: bool, detail: str, **figures: Any) -> Gate:
    """One entry of the manifest's `gates`: what was gated, its verdict, one line a person reads, the figures."""
    return {"gate": name, "passed": bool(passed), "detail": detail, **figures}


def add_gate(bundle: Bundle, entry: Gate) -> None:
    """Record one more gate (the run's accuracy floor) in a written bundle: `passed` stays their conjunction."""
    manifest = bundle.manifest
    manifest["gates"] = [g for g in manifest["gates"] if g["gate"] != entry["gate"]] + [entry]
    manifest["passed"] = all(g["passed"] for g in manifest["gates"])
    write_json(bundle.path / MANIFEST, manifest)


def variant_summary(v: variants.VariantCheck) -> dict[str, Any]:
    keys = ("artifact", "runtime", "images", "top1_agreement", "accuracy", "reference_accuracy", "accuracy_drop",
            "speedup", "passed")  # fmt: skip
    return {k: getattr(v, k) for k in keys}


def run_parity(src: Source, files: dict[str, Path], opts: ExportOptions) -> list[parity.Check]:
    """Eager vs every exact artifact on random inputs and, when the checkpoint's data is on disk, real ones."""
    batch_sizes = opts.batch_sizes
    real = validation_images(src.data, max(batch_sizes)) if src.data else []
    inputs = parity.parity_inputs(src.input_shape, batch_sizes, opts.seed, real, src.preprocess)
    reference = parity.eager_runner(src.model)
    return parity.check_parity(reference, parity.runners_for(files, opts.device), inputs, opts.atol, opts.rtol)


def run_gates(src: Source, files: dict[str, Path], opts: ExportOptions, images: variants.Labelled | None) -> Gated:
    """Every check of a bundle's artifacts: exact parity, then the variants' gate on labelled images."""
    exact = {k: v for k, v in files.items() if k not in VARIANTS.values()}
    checks = run_parity(src, exact, opts)
    gated: list[variants.VariantCheck] = []
    if images is not None:
        runners = parity.runners_for({k: v for k, v in files.items() if k.startswith("onnx")}, opts.device)
        gated = variants.check_variants(parity.eager_runner(src.model), runners, images, opts)
    return checks, gated


def write_artifacts(
    src: Source, opts: ExportOptions, tmp: Path, verbose: bool, calibration: np.ndarray | None
) -> dict[str, dict[str, Any]]:
    """Every requested format, then every variant of the ONNX file, into `tmp`; their manifest entries."""
    torch.manual_seed(opts.seed)
    example = torch.randn(2, *src.input_shape)  # batch >= 2, so the exporters cannot specialise it to 1
    makers = {
        "onnx": lambda p: {"precision": "fp32", **export_onnx(src.model, example, p, opts.opset, verbose)},
        "torchscript": lambda p: {"precision": "fp32", **export_torchscript(src.model, example, p)},
        "pt2": lambda p: {"precision": "fp32", **export_pt2(src.model, example, p, verbose)},
        "onnx-fp16": lambda p: variants.make_fp16(tmp / ARTIFACT_FILES["onnx"], p),
        "onnx-int8": lambda p: variants.make_int8(
            tmp / ARTIFACT_FILES["onnx"], p, _given(calibration), opts.calibration_method, verbose
        ),
    }
    artifacts: dict[str, dict[str, Any]] = {}
    for kind in [*opts.formats, *(VARIANTS[v] for v in opts.variants)]:
        path = tmp / ARTIFACT_FILES[kind]
        t0 = time.perf_counter()
        extra = makers[kind](path)
        seconds = time.perf_counter() - t0
        log.info("exported %s in %.1fs (%s)", kind, seconds, ", ".join(f"{k} {v}" for k, v in extra.items()))
        artifacts[kind] = {
            "path": path.name,
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "export_seconds": round(seconds, 2),
            **extra,
        }
    return artifacts


def _given(x: np.ndarray | None) -> np.ndarray:
    assert x is not None, "calibration images are loaded whenever int8 is asked for"
    return x


def export(cfg: ExportConfig) -> Bundle:
    """Export every requested format and variant, check them, and move the finished bundle into place (even when a
    check fails, so parity.json can be read; the manifest then says `parity.passed: false` and serving refuses it)."""
    src = load_source(cfg.checkpoint, cfg.bare)
    opts = cfg.options
    # the images the variants need are found before anything is written: a missing folder is a usage error
    images = variants.gate_images(src, opts) if opts.variants else None
    calibration = variants.calibration_images(src, opts) if "int8" in opts.variants else None
    tmp = _staging_dir(cfg.out)
    try:
        artifacts = write_artifacts(src, opts, tmp, cfg.verbose, calibration[0] if calibration else None)
        if calibration is not None:
            artifacts["onnx-int8"]["calibration"]["source"] = calibration[1]
        checks, gated = run_gates(src, {k: tmp / a["path"] for k, a in artifacts.items()}, opts, images)
        manifest = build_manifest(cfg, src, artifacts, (checks, gated))
        ref = write_reference(src, artifacts, tmp, opts.max_batch)
        if ref is not None:
            manifest["reference"] = ref
        write_json(tmp / PARITY, parity_report(manifest, (checks, gated), images))
        write_json(tmp / MANIFEST, manifest)
        move_into_place(tmp, cfg.out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Bundle(cfg.out, manifest, checks, gated)


def parity_report(manifest: dict[str, Any], gates: Gated, images: variants.Labelled | None) -> dict[str, Any]:
    """parity.json: every exact check, and every variant check with the labelled images it ran on."""
    return {
        "passed": manifest["parity"]["passed"],
        "checks": parity.report(gates[0]),
        "variants": variants.report(gates[1]),
        "variant_images": images.source if images is not None else None,
    }


@dataclass
class Verification:
    bundle: Path
    hash_errors: list[str]
    checks: list[parity.Check]
    variant_checks: list[variants.VariantCheck] = field(default_factory=list)

    def raise_if_failed(self) -> None:
        raise_for(self.checks, self.variant_checks, self.hash_errors, f"bundle {self.bundle} failed verification")


def verify(
    bundle: Path, checkpoint: Path | None = None, device: str = "auto", validation_data: Path | None = None
) -> Verification:
    """Re-check every sha256, then re-run parity and the variants' gate against the checkpoint the bundle came from."""
    manifest = check_bundle(bundle)  # a damaged artifact is one line, before any runtime is asked to open it
    reference.read(bundle, manifest)  # and a reference that is not this bundle's
    errors: list[str] = []
    source = manifest["source"]
    ckpt = checkpoint or Path(source["checkpoint"])
    if not ckpt.is_file():
        raise CheckpointError(
            f"the checkpoint the bundle came from ({ckpt}) is not here; pass --checkpoint CKPT to re-run parity"
        )
    if sha256_file(ckpt) != source["sha256"]:
        errors.append(
            f"checkpoint {ckpt}: sha256 differs from the one the bundle was exported from ({source['sha256'][:12]}…)"
        )
    src = load_source(ckpt, bare_overrides(manifest) if source.get("kind") == "state_dict" else {})
    opts = verify_options(manifest, device, validation_data)
    files = {kind: bundle / art["path"] for kind, art in manifest["artifacts"].items()}
    images = variants.gate_images(src, opts) if opts.variants else None
    checks, gated = run_gates(src, files, opts, images)
    if not checks and not gated:
        raise BundleError(f"{bundle} has no artifact to check")
    return Verification(bundle, errors, checks, gated)


def bare_overrides(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a bare state_dict's model is rebuilt from: the manifest says everything the flags said at export."""
    c, h, w = manifest["input"]["shape"][1:]
    return {
        "model": manifest["model"]["arch"],
        "model_kwargs": manifest["model"]["kwargs"],
        "input_shape": (c, h, w),
        "classes": tuple(manifest["classes"]),
        "mean": tuple(manifest["preprocess"]["mean"]),
        "std": tuple(manifest["preprocess"]["std"]),
    }


def verify_options(manifest: dict[str, Any], device: str, validation_data: Path | None) -> ExportOptions:
    """The options the bundle was checked with at export, read back from its manifest."""
    p = manifest["parity"]
    gate = p.get("variant_gate", {})
    kinds = {v: k for k, v in VARIANTS.items()}
    options = ExportOptions(
        max_batch=int(manifest["max_batch"]),
        atol=float(p["atol"]),
        rtol=float(p["rtol"]),
        seed=int(p["seed"]),
        device=device,
        validation_data=validation_data,
        max_accuracy_drop=float(gate.get("max_accuracy_drop", ExportOptions.max_accuracy_drop)),
    )
    agreements = {f"{v}_min_agreement": a for v, a in gate.get("min_agreement", {}).items()}
    present = tuple(kinds[k] for k in manifest["artifacts"] if k in kinds)
    return dataclasses.replace(options, variants=present, **agreements)
