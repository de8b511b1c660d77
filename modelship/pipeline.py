"""The pipeline: `run(cfg) -> RunResult`, train -> export -> gates, the main job and the CI gate.

A plain function like the stages, so tests and scripts call it without argparse. The gates raise the project's own
errors: `ParityError` when an exported artifact disagrees with PyTorch, `GateError` when accuracy is under the bar.
Both carry the result, so a caller can still show what was built before it refused to ship.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelship import repository
from modelship.errors import ConfigError, GateError, ParityError
from modelship.export.config import ExportConfig, ExportOptions
from modelship.manifest import safe_name
from modelship.training.config import TrainConfig

if TYPE_CHECKING:
    from modelship.export.bundle import Bundle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """Options of `modelship run`: the training run, the export of its best checkpoint, and the accuracy bar."""

    train: TrainConfig
    export: ExportOptions = field(default_factory=ExportOptions)
    min_accuracy: float | None = None
    publish: Path | None = None  # a model repository: the bundle goes to REPO/<name>/<next version>/ if it ships

    def __post_init__(self) -> None:
        if self.min_accuracy is not None and not 0 <= self.min_accuracy <= 1:
            raise ConfigError(f"--min-accuracy must be between 0 and 1, got {self.min_accuracy}")
        if self.publish is not None:
            repository.check_target(self.publish)

    @property
    def bundle_dir(self) -> Path:
        """Where a bundle that passed every gate goes."""
        return self.train.out / "bundle"

    @property
    def failed_bundle_dir(self) -> Path:
        """Where a bundle that failed a gate is kept, for inspection: never where a passing one was."""
        return self.train.out / "bundle.failed"

    @property
    def pending_bundle_dir(self) -> Path:
        """Where the bundle waits for its gates' verdict (hidden: nothing reads it as a bundle meanwhile)."""
        return self.train.out / ".bundle.pending"

    @property
    def bundle_name(self) -> str:
        """--name, else data and model, e.g. shapes-cnn."""
        data = self.train.data
        base = Path(data).name if "/" in data else data
        return self.export.name or safe_name(f"{base}-{self.train.model.split(':')[-1]}")


@dataclass
class RunResult:
    """What a run built and how it measured up."""

    checkpoint: Path
    ckpt: dict[str, Any]
    bundle: Bundle
    train_seconds: float
    export_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch that ran (best.pt's stops at best)
    evaluation: dict[str, Any] | None = None  # the shipped ONNX file on the validation split
    report: Path | None = None
    published: Path | None = None  # REPO/<name>/<version>/, with --publish

    @property
    def best_val_acc(self) -> float:
        """The training loop's own validation pass (under its autocast precision) at the best epoch."""
        return max(r["val_acc"] for r in self.ckpt["history"])

    @property
    def shipped(self) -> tuple[int, int] | None:
        """(correct, images) of the shipped fp32 ONNX file on the validation split: what the gate compares."""
        if self.evaluation is None:
            return None
        matrix = self.evaluation["confusion_matrix"]
        return sum(matrix[i][i] for i in range(len(matrix))), int(self.evaluation["n"])

    @property
    def accuracy(self) -> float:
        """What the gate and the headline use: the shipped model's accuracy, else (its data gone) training's."""
        return self.shipped[0] / self.shipped[1] if self.shipped else self.best_val_acc

    @property
    def accuracy_parts(self) -> tuple[str, str]:
        """(the accuracy the gate uses, what it was measured on)."""
        if self.shipped is None:
            return f"{self.best_val_acc:.4f}", "training's own pass: the validation images are not on disk"
        right, n = self.shipped
        return f"{right / n:.4f}", f"{right}/{n} validation images, the shipped onnx model"

    @property
    def accuracy_text(self) -> str:
        value, what = self.accuracy_parts
        return f"accuracy {value} ({what})"

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.export_seconds

    def summary(self) -> list[tuple[str, str]]:
        """(field, value) rows of the table `modelship run` ends with."""
        history, data = self.history or self.ckpt["history"], self.ckpt["data"]
        best = max(self.ckpt["history"], key=lambda r: r["val_acc"])
        rows = [
            (
                "data",
                f"{data['source'].get('name', '?')} ({len(data['classes'])} classes, input {data['input_shape']})",
            ),
            ("model", f"{self.ckpt['model']['arch']} {json.dumps(self.ckpt['model']['kwargs'])}"),
            ("epochs", f"{len(history)} of {self.ckpt['config']['epochs']}, {self.train_seconds:.1f}s"),
            ("accuracy", f"{self.accuracy_parts[0]} ({self.accuracy_parts[1]})"),
            (
                "best val_acc",
                f"{best['val_acc']:.4f} (epoch {best['epoch']}, training's own pass; its checkpoint ships)",
            ),
        ]
        floor = next((g for g in self.bundle.manifest["gates"] if g["gate"] == "min-accuracy"), None)
        if floor is not None:
            verdict = "PASS" if floor["passed"] else "FAIL"
            rows.insert(4, ("min accuracy", f"{floor['min_accuracy']:g} (--min-accuracy)  {verdict}"))  # under it
        checks = self.bundle.checks
        for kind, art in self.bundle.manifest["artifacts"].items():
            if kind.startswith("onnx-"):
                continue  # variants have their own rows
            mine = [c for c in checks if c.artifact == kind]
            worst = max(c.max_abs_err for c in mine)
            verdict = "PASS" if all(c.passed for c in mine) else "FAIL"
            size = f"{art['bytes'] / 1024:.0f} KiB"
            rows.append((kind, f"{art['path']}  {size}  worst max_abs_err {worst:.2e}  parity {verdict}"))
        for v in self.bundle.variant_checks:
            art = self.bundle.manifest["artifacts"][v.artifact]
            gate = (
                f"top-1 agreement {v.top1_agreement:.4f}, accuracy {v.accuracy:.4f} vs fp32 {v.reference_accuracy:.4f}"
            )
            verdict = "PASS" if v.passed else "FAIL"
            rows.append((v.artifact, f"{art['path']}  {art['bytes'] / 1024:.0f} KiB  {gate} on {v.runtime}  {verdict}"))
        p = self.bundle.manifest["parity"]
        tolerance = f"atol {p['atol']:g}, rtol {p['rtol']:g}"
        verdict = "PASS" if p["passed"] else "FAIL"
        gates = f" + {len(self.bundle.variant_checks)} variant gates" if self.bundle.variant_checks else ""
        rows.append(("parity", f"{verdict} ({p['checks']} checks{gates}, {tolerance}, {self.export_seconds:.1f}s)"))
        rows.append(("bundle", str(self.bundle.path)))
        if self.report is not None:
            rows.append(("report", str(self.report)))
        if self.published is not None:
            rows.append(
                ("published", f"version {self.published.name} of {self.published.parent.name}: {self.published}")
            )
        if self.passed:
            rows.append(("serve it", f"modelship serve {self.published or self.bundle.path}"))
        else:
            failed = ", ".join(g["gate"] for g in self.bundle.manifest["gates"] if not g["passed"])
            rows.append(("do not ship", f"{self.bundle.path} failed {failed}: kept to inspect; serve refuses it"))
        return rows

    @property
    def passed(self) -> bool:
        """Every gate of the bundle passed, the run's accuracy floor included: it may ship."""
        return bool(self.bundle.manifest["passed"])


REPORT_IMAGES = 10_000  # validation images the run's report evaluates, evenly spread over the split


def run(cfg: RunConfig) -> RunResult | None:
    """Train, export the best checkpoint to RUN_DIR/bundle, evaluate it on the validation split, write
    RUN_DIR/report.html, then gate on parity and accuracy; with --publish, a bundle that passed every gate goes to
    the model repository as its next version.

    Returns None on the ranks other than 0 of a torchrun job (rank 0 alone exports).
    """
    # the stages bring torch; importing them here keeps `modelship --help` fast
    from modelship.export.bundle import export
    from modelship.training.checkpoint import load_checkpoint
    from modelship.training.train import train

    t0 = time.perf_counter()
    best = train(cfg.train)
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    t1 = time.perf_counter()
    options = dataclasses.replace(cfg.export, name=cfg.bundle_name, device=cfg.train.device)
    bundle = export(ExportConfig(checkpoint=best, out=cfg.pending_bundle_dir, options=options, force=True))
    ckpt = load_checkpoint(best)
    last = best.parent / "last.pt"
    history = load_checkpoint(last)["history"] if last.is_file() else ckpt["history"]
    result = RunResult(best, ckpt, bundle, t1 - t0, time.perf_counter() - t1, history)
    result.evaluation = evaluate_validation(result, cfg.train.device)
    refusal = gate(cfg, result)
    place_bundle(cfg, bundle, refusal is None)
    result.report = write_report(cfg, result, refusal)
    if refusal is not None:
        raise refusal  # nothing is published
    if cfg.publish is not None:
        result.published = repository.publish(bundle.path, cfg.publish)
    return result


def place_bundle(cfg: RunConfig, bundle: Bundle, passed: bool) -> None:
    """Move the judged bundle into place: DIR/bundle when every gate passed (replacing the last one, and the stale
    DIR/bundle.failed of an earlier run), else DIR/bundle.failed, beside an earlier DIR/bundle that passed, which
    stays: a failed run never takes the place of a bundle that may ship."""
    from modelship.export.bundle import move_into_place

    target = cfg.bundle_dir if passed else cfg.failed_bundle_dir
    move_into_place(bundle.path, target)
    bundle.path = target
    if passed and cfg.failed_bundle_dir.exists():
        shutil.rmtree(cfg.failed_bundle_dir, ignore_errors=True)


def gate(cfg: RunConfig, result: RunResult) -> GateError | None:
    """Why the model must not ship, if it must not: ParityError on any failed parity check or variant gate,
    GateError on accuracy under --min-accuracy. The accuracy floor's verdict is recorded in the bundle's manifest
    beside export's gates, so the bundle itself says whether it may ship."""
    from modelship.export.bundle import add_gate
    from modelship.export.bundle import gate as gate_entry

    if cfg.min_accuracy is not None:
        ok = result.accuracy >= cfg.min_accuracy
        verdict = "is at least" if ok else "is under"
        detail = f"{result.accuracy_text} {verdict} --min-accuracy {cfg.min_accuracy:g}"
        entry = gate_entry("min-accuracy", ok, detail, accuracy=result.accuracy, min_accuracy=cfg.min_accuracy)
        add_gate(result.bundle, entry)
    problems = result.bundle.failures
    if problems:
        return ParityError(f"parity failed, the model must not ship: {'; '.join(problems)}", result=result)
    if cfg.min_accuracy is not None and result.accuracy < cfg.min_accuracy:
        return GateError(f"{result.accuracy_text} is under --min-accuracy {cfg.min_accuracy:g}", result=result)
    return None


def evaluate_validation(result: RunResult, device: str) -> dict[str, Any] | None:
    """The bundle's ONNX files (fp32 first, then the variants) on the validation split, as `modelship evaluate`
    measures them; None when the split is not on disk or the bundle has no ONNX file."""
    import numpy as np

    from modelship.evaluate import Evaluation, measure
    from modelship.preprocess import Preprocess, preprocess_image
    from modelship.training.data import source_samples

    manifest = result.bundle.manifest
    backends = tuple(k for k in manifest["artifacts"] if k.startswith("onnx"))
    pairs = source_samples(result.ckpt["data"], "val", REPORT_IMAGES)
    if not pairs or not backends:
        return None
    pre = Preprocess.from_dict(manifest["preprocess"])
    images = (np.stack([preprocess_image(im, pre) for im, _ in pairs[i : i + 256]]) for i in range(0, len(pairs), 256))
    labels = np.asarray([label for _, label in pairs], np.int64)
    blocks = measure(result.bundle.path, manifest, backends, device, images, labels)
    source = result.ckpt["data"]["source"]
    return Evaluation(blocks, list(manifest["classes"]), f"{source.get('name')} validation split", Path()).to_dict()


def write_report(cfg: RunConfig, result: RunResult, refusal: GateError | None) -> Path:
    """RUN_DIR/report.html, with evaluation.json and confusion_matrix.png beside it."""
    from modelship import report
    from modelship.files import write_json

    out = cfg.train.out
    evaluation = result.evaluation
    if evaluation is not None:
        write_json(out / "evaluation.json", evaluation)
        report.confusion_png(evaluation["confusion_matrix"], evaluation["classes"], out / "confusion_matrix.png")
    ckpt = result.ckpt
    page = report.run_page({
        "manifest": result.bundle.manifest, "history": result.history, "evaluation": evaluation,
        "best_epoch": ckpt["epoch"], "accuracy": result.accuracy_parts,
        "data": ckpt["data"], "model": ckpt["model"],
        "config": {**ckpt["config"], "learning_rate": cfg.train.learning_rate},  # the optimiser's default when no --lr
        "bundle_link": os.path.relpath(result.bundle.path, out), "passed": refusal is None,
        "reason": str(refusal) if refusal else "", "seconds": result.seconds,
        "train_seconds": result.train_seconds, "export_seconds": result.export_seconds,
    })  # fmt: skip
    report.write(out / "report.html", page)
    return out / "report.html"
