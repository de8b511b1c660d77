"""`modelship export` and `modelship verify`: flags, configs, and the parity table."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from modelship import repository
from modelship.cli.args import chw, config_from, default, floats, json_object, names
from modelship.devices import DEVICES
from modelship.export.config import CALIBRATION_METHODS, ExportConfig, ExportOptions  # light: no torch import
from modelship.manifest import FORMATS, VARIANTS

log = logging.getLogger("modelship")


def add_export_options(parser: argparse.ArgumentParser, title: str = "export") -> None:
    """Flags `export` and `run` share, in two groups; defaults come from ExportOptions."""

    def d(name: str) -> Any:
        return default(ExportOptions, name)

    p = parser.add_argument_group(title)

    p.add_argument(
        "--formats", type=names, default=d("formats"),
        help=f"{','.join(FORMATS)}; torchscript is legacy (default {','.join(d('formats'))})",
    )  # fmt: skip
    p.add_argument("--opset", type=int, default=d("opset"), help="ONNX opset (default %(default)s)")
    p.add_argument(
        "--max-batch", type=int, default=d("max_batch"), help="largest batch parity checks (default %(default)s)"
    )
    p.add_argument("--atol", type=float, default=d("atol"), help="absolute tolerance (default %(default)s)")
    p.add_argument("--rtol", type=float, default=d("rtol"), help="relative tolerance (default %(default)s)")
    p.add_argument(
        "--name", default=d("name"), help="model name in the bundle and the v2 API (default: the bundle folder's name)"
    )
    p.add_argument(
        "--publish", type=Path, metavar="REPO",
        help="when every gate passes, also copy the bundle to the model repository REPO as REPO/<name>/<next "
        "version>/, in one rename (default: not published)",
    )  # fmt: skip
    v = parser.add_argument_group("deployment variants, gated on agreement with fp32 and accuracy on labelled images")
    v.add_argument(
        "--variants", type=names, default=d("variants"), help=f"{','.join(VARIANTS)} of the ONNX file (default none)"
    )
    v.add_argument(
        "--calibration-data",
        type=Path,
        default=d("calibration_data"),
        metavar="PATH",
        help="int8: images to calibrate on (default: a sample of the checkpoint's training data)",
    )
    v.add_argument(
        "--calibration-size",
        type=int,
        default=d("calibration_size"),
        metavar="N",
        help="int8: calibration images (default %(default)s)",
    )
    v.add_argument(
        "--calibration-method",
        choices=CALIBRATION_METHODS,
        default=d("calibration_method"),
        help="int8: how activation ranges are chosen (default %(default)s)",
    )
    v.add_argument(
        "--validation-data",
        type=Path,
        default=d("validation_data"),
        metavar="PATH",
        help="labelled images, a folder per class, to gate variants on (default: the checkpoint's validation split)",
    )
    v.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=d("max_accuracy_drop"),
        help="largest accuracy loss against fp32 (default %(default)s)",
    )
    v.add_argument(
        "--fp16-min-agreement",
        type=float,
        default=d("fp16_min_agreement"),
        help="fp16: top-1 agreement with eager fp32 (default %(default)s)",
    )
    v.add_argument(
        "--int8-min-agreement",
        type=float,
        default=d("int8_min_agreement"),
        help="int8: top-1 agreement with eager fp32 (default %(default)s)",
    )


def export_options(args: argparse.Namespace) -> ExportOptions:
    return config_from(ExportOptions, args)


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="modelship checkpoint or bare state_dict file")
    p.add_argument("--out", type=Path, required=True, metavar="BUNDLE_DIR", help="bundle directory to write")
    add_export_options(p)
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument(
        "--device", choices=DEVICES, default=default(ExportOptions, "device"),
        help="also check ONNX Runtime's CUDA provider: auto = when usable (default %(default)s)",
    )  # fmt: skip
    s = p.add_argument_group("bare state_dict (ignored for modelship checkpoints)")
    s.add_argument("--model", help="registry name or package.module:factory")
    s.add_argument("--model-kwargs", type=json_object, metavar="JSON", help="factory kwargs")
    s.add_argument("--input-shape", type=chw, metavar="C,H,W", help="input tensor shape")
    s.add_argument("--classes", type=names, metavar="A,B,...", help="class names (default 0..N-1)")
    s.add_argument("--mean", type=floats, help="per-channel normalisation mean (default 0)")
    s.add_argument("--std", type=floats, help="per-channel normalisation std (default 1)")


def print_checks(checks: list[Any], variant_checks: list[Any]) -> None:
    from modelship.export import parity, variants

    print(parity.table(checks))
    if variant_checks:
        print()
        print(variants.table(variant_checks))


def cmd_export(args: argparse.Namespace) -> int:
    from modelship.export.bundle import export

    if args.publish is not None:
        repository.check_target(args.publish)  # before the work, not after it
    bundle = export(config_from(ExportConfig, args, options=export_options(args)))
    print_checks(bundle.checks, bundle.variant_checks)
    bundle.raise_if_failed()  # nothing is published
    log.info("bundle %s: %s, parity passed", bundle.path, ", ".join(sorted(bundle.manifest["artifacts"])))
    if args.publish is not None:
        target = repository.publish(bundle.path, args.publish)
        log.info("published %s version %s: %s", bundle.manifest["name"], target.name, target)
    return 0


def add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    p.add_argument("--checkpoint", type=Path, metavar="CKPT", help="default: the checkpoint the manifest names")
    p.add_argument("--device", choices=DEVICES, default=default(ExportOptions, "device"), help="runtimes to re-check")
    p.add_argument(
        "--validation-data",
        type=Path,
        metavar="PATH",
        help="labelled images for the variants' gate (default: the checkpoint's validation split)",
    )


def cmd_verify(args: argparse.Namespace) -> int:
    from modelship.export.bundle import verify

    result = verify(args.bundle, args.checkpoint, args.device, args.validation_data)
    print_checks(result.checks, result.variant_checks)
    result.raise_if_failed()
    log.info("bundle %s verified: hashes match, parity holds", args.bundle)
    return 0


def add_triton_args(p: argparse.ArgumentParser) -> None:
    from modelship.export.triton import TRITON, TritonConfig

    def d(name: str) -> Any:
        return default(TritonConfig, name)

    p.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    p.add_argument("--out", type=Path, required=True, metavar="REPO", help="a new (or empty) folder for the repository")
    p.add_argument("--backend", default=d("backend"), help=f"which artifact: {', '.join(TRITON)} (default %(default)s)")
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=d("max_batch_size"),
        help="Triton's max_batch_size (default: the bundle's checked maximum)",
    )
    p.add_argument(
        "--instances", type=int, default=d("instances"), help="model instances per device (default %(default)s)"
    )
    p.add_argument(
        "--queue-delay-us",
        type=int,
        default=d("queue_delay_us"),
        help="dynamic batching delay in microseconds (default %(default)s)",
    )


def cmd_triton(args: argparse.Namespace) -> int:
    from modelship.export.triton import TritonConfig, write_repository

    model_dir = write_repository(config_from(TritonConfig, args))
    print(model_dir)
    log.info(
        "Triton repository %s written; run it with: docker run --gpus all -p8000:8000 -v %s:/models "
        "nvcr.io/nvidia/tritonserver:<xx.yy>-py3 tritonserver --model-repository=/models",
        args.out, args.out.resolve(),
    )  # fmt: skip
    return 0
