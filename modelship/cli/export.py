"""`modelship export` and `modelship verify`: flags, configs, and the parity table."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from modelship.cli.args import chw, config_from, default, floats, json_object, names
from modelship.devices import DEVICES
from modelship.export.config import ExportConfig, ExportOptions  # light: no torch import
from modelship.manifest import ARTIFACT_FILES

log = logging.getLogger("modelship")


def add_export_options(p: Any) -> None:
    """Flags `export` and `run` share; defaults come from ExportOptions."""

    def d(name: str) -> Any:
        return default(ExportOptions, name)

    p.add_argument(
        "--formats", type=names, default=d("formats"),
        help=f"{','.join(ARTIFACT_FILES)} (default {','.join(d('formats'))})",
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


def cmd_export(args: argparse.Namespace) -> int:
    from modelship.export.bundle import export
    from modelship.export.parity import table

    bundle = export(config_from(ExportConfig, args, options=export_options(args)))
    print(table(bundle.checks))
    bundle.raise_if_failed()
    log.info("bundle %s: %s, parity passed", bundle.path, ", ".join(sorted(bundle.manifest["artifacts"])))
    return 0


def add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    p.add_argument("--checkpoint", type=Path, metavar="CKPT", help="default: the checkpoint the manifest names")
    p.add_argument("--device", choices=DEVICES, default=default(ExportOptions, "device"), help="runtimes to re-check")


def cmd_verify(args: argparse.Namespace) -> int:
    from modelship.export.bundle import verify
    from modelship.export.parity import table

    result = verify(args.bundle, args.checkpoint, args.device)
    print(table(result.checks))
    result.raise_if_failed()
    log.info("bundle %s verified: hashes match, parity holds", args.bundle)
    return 0
