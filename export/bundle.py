"""`export(cfg) -> Bundle` and `verify(...)`: the bundle is built in a temporary directory and renamed into place."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from modelship.errors import BundleError, CheckpointError, ConfigError, ParityError
from modelship.export import parity
from modelship.export.config import ExportConfig
from modelship.export.formats import INPUT_NAME, OUTPUT_NAME, export_onnx, export_torchscript
from modelship.export.source import Source, load_source
from modelship.files import sha256_file, write_json
from modelship.manifest import ARTIFACT_FILES, FORMAT, MANIFEST, PARITY, VERSION, hash_mismatches, read_manifest
from modelship.training.data import validation_images
from modelship.versions import versions

log = logging.getLogger(__name__)


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    checks: list[parity.Check]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def raise_if_failed(self) -> None:
        """ParityError naming every failed check: the bundle is written, but it must not ship."""
        raise_for(self.checks, [], f"bundle {self.path} written, but it must not ship")


def raise_for(checks: list[parity.Check], problems: list[str], what: str) -> None:
    """One ParityError listing every failed check and every other problem (hash mismatches), if there are any."""
    problems = problems + [c.describe() for c in checks if not c.passed]
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


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished bundle over `out`; an old bundle is moved aside first and deleted after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_manifest(
    cfg: ExportConfig, src: Source, artifacts: dict[str, dict[str, Any]], checks: list[parity.Check]
) -> dict[str, Any]:
    """The bundle's manifest.json (ARCHITECTURE.md lists its keys): written here and nowhere else."""
    c, h, w = src.input_shape
    opts = cfg.options
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
            "atol": opts.atol,
            "rtol": opts.rtol,
            "batch_sizes": opts.batch_sizes,
            "seed": opts.seed,
            "report": PARITY,
        },
        "source": src.info,
        "versions": versions("torch", "onnx", "onnxscript", "onnxruntime"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run_parity(
    src: Source, files: dict[str, Path], *, batch_sizes: list[int], seed: int, atol: float, rtol: float, device: str
) -> list[parity.Check]:
    """Eager vs every artifact on random inputs and, when the checkpoint's data is on disk, real ones."""
    real = validation_images(src.data, max(batch_sizes)) if src.data else []
    inputs = parity.parity_inputs(src.input_shape, batch_sizes, seed, real, src.preprocess)
    return parity.check_parity(parity.eager_runner(src.model), parity.runners_for(files, device), inputs, atol, rtol)


def export(cfg: ExportConfig) -> Bundle:
    """Export every requested format, check parity, and move the finished bundle into place (even when parity fails,
    so parity.json can be read; the manifest then says `parity.passed: false` and the server refuses it)."""
    src = load_source(cfg.checkpoint, cfg.bare)
    opts = cfg.options
    tmp = _staging_dir(cfg.out)
    try:
        torch.manual_seed(opts.seed)
        example = torch.randn(2, *src.input_shape)  # batch >= 2, so the exporter cannot specialise it to 1
        artifacts: dict[str, dict[str, Any]] = {}
        files: dict[str, Path] = {}
        for fmt in opts.formats:
            path = tmp / ARTIFACT_FILES[fmt]
            t0 = time.perf_counter()
            if fmt == "onnx":
                extra = export_onnx(src.model, example, path, opts.opset, cfg.verbose)
            else:
                extra = export_torchscript(src.model, example, path)
            seconds = time.perf_counter() - t0
            log.info("exported %s (%s) in %.1fs", fmt, ", ".join(f"{k} {v}" for k, v in extra.items()), seconds)
            files[fmt] = path
            artifacts[fmt] = {
                "path": path.name,
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
                "export_seconds": round(seconds, 2),
                **extra,
            }
        checks = run_parity(
            src, files, batch_sizes=opts.batch_sizes, seed=opts.seed, atol=opts.atol, rtol=opts.rtol, device=opts.device
        )
        manifest = build_manifest(cfg, src, artifacts, checks)
        write_json(tmp / PARITY, {"passed": manifest["parity"]["passed"], "checks": parity.report(checks)})
        write_json(tmp / MANIFEST, manifest)
        _move_into_place(tmp, cfg.out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Bundle(cfg.out, manifest, checks)


@dataclass
class Verification:
    bundle: Path
    hash_errors: list[str]
    checks: list[parity.Check]

    def raise_if_failed(self) -> None:
        raise_for(self.checks, self.hash_errors, f"bundle {self.bundle} failed verification")


def verify(bundle: Path, checkpoint: Path | None = None, device: str = "auto") -> Verification:
    """Re-check every sha256, then re-run parity against the checkpoint the bundle came from."""
    manifest = read_manifest(bundle)
    errors = hash_mismatches(bundle, manifest)
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
    c, h, w = manifest["input"]["shape"][1:]
    src = load_source(
        ckpt,
        {
            "model": manifest["model"]["arch"],
            "model_kwargs": manifest["model"]["kwargs"],
            "input_shape": (c, h, w),
            "classes": tuple(manifest["classes"]),
            "mean": tuple(manifest["preprocess"]["mean"]),
            "std": tuple(manifest["preprocess"]["std"]),
        }
        if source.get("kind") == "state_dict"
        else {},
    )
    p = manifest["parity"]
    files = {kind: bundle / art["path"] for kind, art in manifest["artifacts"].items()}
    checks = run_parity(
        src,
        files,
        batch_sizes=list(p["batch_sizes"]),
        seed=int(p["seed"]),
        atol=float(p["atol"]),
        rtol=float(p["rtol"]),
        device=device,
    )
    if not checks:
        raise BundleError(f"{bundle} has no artifact to check")
    return Verification(bundle, errors, checks)
