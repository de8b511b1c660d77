"""The `modelship` command: parses flags, builds a stage's config, calls the stage's function.

Heavy libraries are imported inside the sub-command functions, so `modelship --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modelship.errors import ModelshipError

log = logging.getLogger("modelship")


# ------------------------------------------------------------------------------------------------ value parsers


def _ints(text: str, n: int, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if len(vals) != n or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected {what} ({n} positive integers), got {text!r}")
    return vals


def hw(text: str) -> tuple[int, int]:
    return _ints(text, 2, "H,W such as 32,32")  # type: ignore[return-value]


def chw(text: str) -> tuple[int, int, int]:
    return _ints(text, 3, "C,H,W such as 3,32,32")  # type: ignore[return-value]


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"width\": 64}}', got {text!r}")
    return value


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def names(text: str) -> list[str]:
    vals = [v.strip() for v in text.split(",")]
    if any(not v for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated names without blanks, got {text!r}")
    return vals


# ------------------------------------------------------------------------------------------------ train


def add_train_args(p: argparse.ArgumentParser, *, out_required: bool = True) -> None:
    """Flags of `train` (and of `run`, which passes them through)."""
    from modelship.training.config import AMP_MODES, DEVICES, OPTIMIZERS, SCHEDULES  # light: no torch import

    d = p.add_argument_group("data")
    d.add_argument("--data", default="shapes", help="shapes | mnist | fashion-mnist | cifar10 | PATH to an ImageFolder")
    d.add_argument(
        "--data-dir",
        type=Path,
        help="where built-in datasets live (default $MODELSHIP_DATA or ~/.cache/modelship/data)",
    )
    d.add_argument("--download", action="store_true", help="let torchvision download mnist/fashion-mnist/cifar10")
    d.add_argument(
        "--val-split", type=float, default=0.2, help="validation fraction for a folder without val/ (default 0.2)"
    )
    d.add_argument("--shapes-train", type=int, default=2000, help="shapes: training images (default 2000)")
    d.add_argument("--shapes-val", type=int, default=500, help="shapes: validation images (default 500)")
    d.add_argument("--image-size", type=hw, help="resize images to H,W (default: the data's most common size)")
    d.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crop + flip (default: on for RGB)",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", default="cnn", help="mlp | cnn | resnet18 | mobilenet_v3_small | package.module:factory")
    m.add_argument(
        "--model-kwargs",
        type=json_object,
        default={},
        metavar="JSON",
        help="extra factory kwargs, e.g. '{\"width\": 64}'",
    )
    m.add_argument(
        "--init-from",
        type=Path,
        metavar="STATE_DICT",
        help="start from these weights; a head of another size is reinitialised",
    )
    m.add_argument("--freeze-backbone", action="store_true", help="train the classifier head only")
    m.add_argument("--pretrained", action="store_true", help="torchvision weights from the local torch hub cache")
    t = p.add_argument_group("optimisation")
    t.add_argument("--epochs", type=int, default=5, help="total epochs, also when resuming (default 5)")
    t.add_argument("--batch-size", type=int, default=64, help="per process (default 64)")
    t.add_argument("--lr", type=float, help="learning rate (default: adamw 3e-3, adam 1e-3, sgd 0.05)")
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--momentum", type=float, default=0.9, help="sgd momentum (Nesterov)")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    t.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    t.add_argument("--warmup-epochs", type=float, default=0.0)
    t.add_argument("--step-size", type=int, help="step schedule: epochs between decays (default epochs/3)")
    t.add_argument("--gamma", type=float, default=0.1, help="step schedule: decay factor")
    t.add_argument("--patience", type=int, help="stop after this many epochs without a better val_acc")
    t.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm")
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--balanced-sampler", action="store_true", help="draw every class equally often")
    r = p.add_argument_group("runtime")
    r.add_argument("--amp", choices=AMP_MODES, default="none", help="mixed precision (fp16 uses a GradScaler)")
    r.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
        help="torch.compile the model (backend default: inductor)",
    )
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    r.add_argument("--device", choices=DEVICES, default="auto")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    r.add_argument("--workers", type=int, help="DataLoader workers (default 0 on CPU, up to 8 on CUDA)")
    r.add_argument("--resume", type=Path, metavar="CKPT", help="continue from RUN_DIR/checkpoints/last.pt")
    if out_required:
        r.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run directory")


def train_config(args: argparse.Namespace, out: Path) -> Any:
    from modelship.training.config import TrainConfig

    return TrainConfig(
        out=out,
        data=args.data,
        data_dir=args.data_dir,
        download=args.download,
        val_split=args.val_split,
        shapes_train=args.shapes_train,
        shapes_val=args.shapes_val,
        image_size=args.image_size,
        augment=args.augment,
        model=args.model,
        model_kwargs=args.model_kwargs,
        init_from=args.init_from,
        freeze_backbone=args.freeze_backbone,
        pretrained=args.pretrained,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        optimizer=args.optimizer,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        step_size=args.step_size,
        gamma=args.gamma,
        patience=args.patience,
        clip_grad=args.clip_grad,
        label_smoothing=args.label_smoothing,
        balanced_sampler=args.balanced_sampler,
        amp=args.amp,
        compile=args.compile,
        channels_last=args.channels_last,
        device=args.device,
        seed=args.seed,
        deterministic=args.deterministic,
        workers=args.workers,
        resume=args.resume,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from modelship.training.train import train

    best = train(train_config(args, args.out))
    if int(os.environ.get("RANK", "0")) == 0:
        print(best)
    return 0


# ------------------------------------------------------------------------------------------------ export


def add_export_args(p: argparse.ArgumentParser, *, positional: bool = True) -> None:
    """Flags of `export` (and of `run`, which passes them through)."""
    if positional:
        p.add_argument("checkpoint", type=Path, metavar="CKPT", help="modelship checkpoint or bare state_dict file")
        p.add_argument("--out", type=Path, required=True, metavar="BUNDLE_DIR", help="bundle directory to write")
    p.add_argument("--formats", type=names, default=["onnx", "torchscript"], help="onnx,torchscript (default both)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch parity checks (default 64)")
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default 1e-4)")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance (default 1e-3)")
    p.add_argument("--name", help="model name in the bundle and the v2 API (default: the bundle folder's name)")
    if positional:
        p.add_argument("--force", action="store_true", help="replace an existing bundle")
        p.add_argument(
            "--device",
            choices=("auto", "cpu", "cuda"),
            default="auto",
            help="also check ONNX Runtime's CUDA provider: auto = when usable",
        )
        s = p.add_argument_group("bare state_dict (ignored for modelship checkpoints)")
        s.add_argument("--model", help="registry name or package.module:factory")
        s.add_argument("--model-kwargs", type=json_object, metavar="JSON", help="factory kwargs")
        s.add_argument("--input-shape", type=chw, metavar="C,H,W", help="input tensor shape")
        s.add_argument("--classes", type=names, metavar="A,B,...", help="class names (default 0..N-1)")
        s.add_argument("--mean", type=floats, help="per-channel normalisation mean (default 0)")
        s.add_argument("--std", type=floats, help="per-channel normalisation std (default 1)")


def export_config(
    args: argparse.Namespace, checkpoint: Path, out: Path, *, device: str, force: bool, name: str | None, **bare: Any
) -> Any:
    """ExportConfig from parsed flags; `bare` holds the state_dict-only options (model, input_shape, ...)."""
    from modelship.export.config import ExportConfig

    return ExportConfig(
        checkpoint=checkpoint,
        out=out,
        formats=tuple(args.formats),
        opset=args.opset,
        max_batch=args.max_batch,
        atol=args.atol,
        rtol=args.rtol,
        force=force,
        name=name,
        device=device,
        verbose=args.verbose,
        **bare,
    )


def report_parity(checks: list[Any], problems: list[str], what: str) -> None:
    """The parity table on stdout; one GateError naming every failed check and hash mismatch, if any."""
    from modelship.errors import GateError
    from modelship.export.parity import table

    print(table(checks))
    problems = problems + [c.describe() for c in checks if not c.passed]
    if problems:
        raise GateError(f"{what}: {len(problems)} check(s) failed: " + "; ".join(problems))


def cmd_export(args: argparse.Namespace) -> int:
    from modelship.export.bundle import export

    cfg = export_config(
        args,
        args.checkpoint,
        args.out,
        device=args.device,
        force=args.force,
        name=args.name,
        model=args.model,
        model_kwargs=args.model_kwargs,
        input_shape=args.input_shape,
        classes=tuple(args.classes) if args.classes else None,
        mean=args.mean,
        std=args.std,
    )
    bundle = export(cfg)
    report_parity(bundle.checks, [], f"bundle {bundle.path} written, but it must not ship")
    log.info("bundle %s: %s, parity passed", bundle.path, ", ".join(sorted(bundle.manifest["artifacts"])))
    return 0


def add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    p.add_argument("--checkpoint", type=Path, metavar="CKPT", help="default: the checkpoint the manifest names")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="runtimes to re-check")


def cmd_verify(args: argparse.Namespace) -> int:
    from modelship.export.bundle import verify

    result = verify(args.bundle, args.checkpoint, args.device)
    report_parity(result.checks, result.hash_errors, f"bundle {args.bundle} failed verification")
    log.info("bundle %s verified: hashes match, parity holds", args.bundle)
    return 0


# ------------------------------------------------------------------------------------------------ run


def add_run_args(p: argparse.ArgumentParser) -> None:
    add_train_args(p, out_required=False)
    p.add_argument("--out", type=Path, default=Path("runs/run"), metavar="DIR", help="run directory (default runs/run)")
    e = p.add_argument_group("export (the bundle is written to DIR/bundle, replacing an earlier one)")
    add_export_args(e, positional=False)  # type: ignore[arg-type]
    p.add_argument("--min-accuracy", type=float, metavar="ACC", help="fail (exit 1) when the best val_acc is lower")


def bundle_name(data: str, model: str) -> str:
    """A v2-friendly default model name such as shapes-cnn."""
    import re

    base = Path(data).name if os.sep in data else data
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{base}-{model.split(':')[-1]}").strip("-._")[:64] or "model"


def run_summary(
    ckpt: dict[str, Any], bundle: Any, train_seconds: float, export_seconds: float
) -> list[tuple[str, str]]:
    """(field, value) rows of the table `modelship run` ends with."""
    history = ckpt["history"]
    best = max(history, key=lambda r: r["val_acc"])
    data = ckpt["data"]
    rows = [
        ("data", f"{data['source'].get('name', '?')} ({len(data['classes'])} classes, input {data['input_shape']})"),
        ("model", f"{ckpt['model']['arch']} {json.dumps(ckpt['model']['kwargs'])}"),
        ("epochs", f"{len(history)} of {ckpt['config']['epochs']}, {train_seconds:.1f}s"),
        ("best val_acc", f"{best['val_acc']:.4f} (epoch {best['epoch']})"),
    ]
    for kind, art in bundle.manifest["artifacts"].items():
        checks = [c for c in bundle.checks if c.artifact == kind]
        worst = max(c.max_abs_err for c in checks)
        verdict = "PASS" if all(c.passed for c in checks) else "FAIL"
        rows.append(
            (kind, f"{art['path']}  {art['bytes'] / 1024:.0f} KiB  worst max_abs_err {worst:.2e}  parity {verdict}")
        )
    p = bundle.manifest["parity"]
    verdict = "PASS" if p["passed"] else "FAIL"
    tolerance = f"atol {p['atol']:g}, rtol {p['rtol']:g}"
    rows.append(("parity", f"{verdict} ({p['checks']} checks, {tolerance}, {export_seconds:.1f}s)"))
    rows.append(("bundle", str(bundle.path)))
    rows.append(("serve it", f"modelship serve {bundle.path}"))
    return rows


def cmd_run(args: argparse.Namespace) -> int:
    import time

    from modelship.errors import ConfigError, GateError
    from modelship.export.bundle import export
    from modelship.training.checkpoint import load_checkpoint
    from modelship.training.train import train

    if args.min_accuracy is not None and not 0 <= args.min_accuracy <= 1:
        raise ConfigError(f"--min-accuracy must be between 0 and 1, got {args.min_accuracy}")
    t0 = time.perf_counter()
    best = train(train_config(args, args.out))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 alone exports
    t1 = time.perf_counter()
    name = args.name or bundle_name(args.data, args.model)
    bundle = export(export_config(args, best, args.out / "bundle", device=args.device, force=True, name=name))
    t2 = time.perf_counter()
    ckpt = load_checkpoint(best)
    rows = run_summary(ckpt, bundle, t1 - t0, t2 - t1)
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    acc = max(r["val_acc"] for r in ckpt["history"])
    problems = [c.describe() for c in bundle.checks if not c.passed]
    if problems:
        raise GateError(f"parity failed, the model must not ship: {'; '.join(problems)}")
    if args.min_accuracy is not None and acc < args.min_accuracy:
        raise GateError(f"best val_acc {acc:.4f} is under --min-accuracy {args.min_accuracy:g}")
    print(f"modelship run: OK in {t2 - t0:.0f}s, val_acc {acc:.4f}, parity passed: {bundle.path}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------ serve


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    p.add_argument("--backend", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default), 0.0.0.0 or ::")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32, help="requests per dynamic batch (default 32)")
    p.add_argument(
        "--batch-timeout", type=float, default=0.002, help="seconds to wait for a batch to fill (default 0.002)"
    )
    p.add_argument("--workers-per-device", type=int, default=2, help="inference processes per CPU/GPU (default 2)")
    p.add_argument("--api-servers", type=int, help="HTTP server processes (default: one per inference worker)")
    p.add_argument("--threads", type=int, help="compute threads per worker (default: CPU cores / workers)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a request is answered 504 (default 30)")
    p.add_argument("--max-payload-mb", type=float, default=16.0, help="larger bodies are answered 413 (default 16)")
    p.add_argument("--api-key", help="require this key on every route but health (default: $MODELSHIP_API_KEY)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.add_argument("--access-log", action="store_true", help="log every request")


def cmd_serve(args: argparse.Namespace) -> int:
    from modelship.serving.server import ServeConfig, serve

    api_key = args.api_key if args.api_key is not None else os.environ.get("MODELSHIP_API_KEY")
    serve(
        ServeConfig(
            bundle=args.bundle,
            backend=args.backend,
            device=args.device,
            host=args.host,
            port=args.port,
            max_batch_size=args.max_batch_size,
            batch_timeout=args.batch_timeout,
            workers_per_device=args.workers_per_device,
            api_servers=args.api_servers,
            threads=args.threads,
            timeout=args.timeout,
            max_payload_mb=args.max_payload_mb,
            api_key=api_key,
            log_level=args.log_level,
            access_log=args.access_log,
        )
    )
    return 0


def add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server address (default http://127.0.0.1:8000)")
    p.add_argument("--top-k", type=int, help="how many classes to list (default: the server's, up to 5)")
    p.add_argument("--json", action="store_true", help="print the server's JSON answer per image")
    p.add_argument("--api-key", help="default: $MODELSHIP_API_KEY")
    p.add_argument("--timeout", type=float, default=30.0)


def cmd_predict(args: argparse.Namespace) -> int:
    from modelship.serving.client import Client

    client = Client(args.url, args.api_key or os.environ.get("MODELSHIP_API_KEY"), args.timeout)
    for image in args.images:
        answer = client.predict_image(image, args.top_k)
        if args.json:
            print(json.dumps({"image": str(image), **answer}))
        else:
            others = ", ".join(f"{t['label']} {t['score']:.3f}" for t in answer["top_k"][1:])
            print(f"{image}\t{answer['label']}\t{answer['score']:.4f}" + (f"\t({others})" if others else ""))
    return 0


# ------------------------------------------------------------------------------------------------ main


COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = [
    ("run", "train, export and check parity in one go: the main job and the CI gate", add_run_args, cmd_run),
    ("train", "train a classifier and write state_dict checkpoints", add_train_args, cmd_train),
    (
        "export",
        "export a checkpoint to ONNX and TorchScript, check parity, write a bundle",
        add_export_args,
        cmd_export,
    ),
    ("verify", "re-check a bundle's hashes and parity (e.g. after a runtime upgrade)", add_verify_args, cmd_verify),
    ("serve", "serve a bundle over HTTP: /predict and KServe v2, dynamic batching", add_serve_args, cmd_serve),
    ("predict", "classify image files with a running server", add_predict_args, cmd_predict),
]


def build_parser() -> argparse.ArgumentParser:
    import modelship

    parser = argparse.ArgumentParser(
        prog="modelship", description="Train -> export -> serve for PyTorch image classifiers."
    )
    parser.add_argument("--version", action="version", version=f"modelship {modelship.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add_args, func in COMMANDS:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        add_args(sp)
        sp.set_defaults(func=func)
    return parser


def configure_logging(verbose: bool) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    for noisy in ("torch", "onnxscript", "onnx_ir", "urllib3", "PIL", "matplotlib", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `modelship` console command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.func(args))
    except ModelshipError as e:
        if args.verbose:
            log.exception("error")
        print(f"modelship {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"modelship {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
