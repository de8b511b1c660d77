"""`modelship train` and `modelship run`: flags, configs, and the summary table."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from modelship.cli.args import config_from, default, hw, json_object
from modelship.cli.export import add_export_options, export_options
from modelship.devices import DEVICES
from modelship.errors import GateError
from modelship.pipeline import RunConfig, RunResult, run
from modelship.training.config import (
    AMP_MODES,
    DATA_CACHE_MODES,
    OPTIMIZERS,
    SCHEDULES,
    TrainConfig,
)  # light: no torch import


def add_train_args(p: argparse.ArgumentParser, *, out_required: bool = True) -> None:
    """Flags of `train` (and of `run`, which passes them through); defaults come from TrainConfig."""

    def d(name: str) -> object:
        return default(TrainConfig, name)

    g = p.add_argument_group("data")
    g.add_argument(
        "--data", default=d("data"), help="shapes | mnist | fashion-mnist | cifar10 | PATH to an ImageFolder"
    )
    g.add_argument(
        "--data-dir",
        type=Path,
        help="where built-in datasets live (default $MODELSHIP_DATA or ~/.cache/modelship/data)",
    )
    g.add_argument("--download", action="store_true", help="let torchvision download mnist/fashion-mnist/cifar10")
    g.add_argument(
        "--val-split",
        type=float,
        default=d("val_split"),
        help="validation fraction for a folder without val/ (default %(default)s)",
    )
    g.add_argument(
        "--shapes-train", type=int, default=d("shapes_train"), help="shapes: training images (default %(default)s)"
    )
    g.add_argument(
        "--shapes-val", type=int, default=d("shapes_val"), help="shapes: validation images (default %(default)s)"
    )
    g.add_argument("--image-size", type=hw, help="resize images to H,W (default: the data's most common size)")
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=d("augment"),
        help="random crop + flip (default: on for RGB)",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=d("model"),
        help="mlp | cnn | resnet18 | mobilenet_v3_small | package.module:factory (default %(default)s)",
    )
    g.add_argument(
        "--model-kwargs",
        type=json_object,
        default=d("model_kwargs"),
        metavar="JSON",
        help="extra factory kwargs, e.g. '{\"width\": 64}'",
    )
    g.add_argument(
        "--init-from",
        type=Path,
        metavar="STATE_DICT",
        help="start from these weights; a head of another size is reinitialised",
    )
    g.add_argument("--freeze-backbone", action="store_true", help="train the classifier head only")
    g.add_argument("--pretrained", action="store_true", help="torchvision weights from the local torch hub cache")
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--epochs", type=int, default=d("epochs"), help="total epochs, also when resuming (default %(default)s)"
    )
    g.add_argument("--batch-size", type=int, default=d("batch_size"), help="per process (default %(default)s)")
    g.add_argument("--lr", type=float, help="learning rate (default: adamw 3e-3, adam 1e-3, sgd 0.05)")
    g.add_argument("--weight-decay", type=float, default=d("weight_decay"), help="(default %(default)s)")
    g.add_argument("--momentum", type=float, default=d("momentum"), help="sgd momentum, Nesterov (default %(default)s)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d("optimizer"), help="(default %(default)s)")
    g.add_argument("--schedule", choices=SCHEDULES, default=d("schedule"), help="(default %(default)s)")
    g.add_argument("--warmup-epochs", type=float, default=d("warmup_epochs"), help="(default %(default)s)")
    g.add_argument("--step-size", type=int, help="step schedule: epochs between decays (default epochs/3)")
    g.add_argument("--gamma", type=float, default=d("gamma"), help="step schedule: decay factor (default %(default)s)")
    g.add_argument("--patience", type=int, help="stop after this many epochs without a better val_acc")
    g.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm")
    g.add_argument("--label-smoothing", type=float, default=d("label_smoothing"), help="(default %(default)s)")
    g.add_argument("--balanced-sampler", action="store_true", help="draw every class equally often")
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--amp",
        choices=AMP_MODES,
        default=d("amp"),
        help="mixed precision: auto = bf16 where the CPU/GPU has it natively, else fp32; fp16 uses a GradScaler "
        "(default %(default)s)",
    )
    g.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
        help="torch.compile the model (backend default: inductor)",
    )
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=d("channels_last"),
        help="default: on for convolutional models",
    )
    g.add_argument("--device", choices=DEVICES, default=d("device"), help="(default %(default)s)")
    g.add_argument("--seed", type=int, default=d("seed"), help="(default %(default)s)")
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    g.add_argument("--workers", type=int, help="DataLoader workers on the PIL path (default 0 on CPU, up to 8 on CUDA)")
    g.add_argument(
        "--data-cache", choices=DATA_CACHE_MODES, default=d("data_cache"),
        help="decode images once into RAM or GPU memory, augment whole batches there: auto = when it fits "
        "(default %(default)s)",
    )  # fmt: skip
    g.add_argument("--cache-dir", type=Path, default=d("cache_dir"), help="where decoded data is cached between runs "
                   "(default DATA_DIR/decoded)")  # fmt: skip
    g.add_argument("--resume", type=Path, metavar="CKPT", help="continue from RUN_DIR/checkpoints/last.pt")
    g.add_argument("--force", action="store_true", help="replace the run already in --out (refused otherwise)")
    if out_required:
        g.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run directory")


def cmd_train(args: argparse.Namespace) -> int:
    from modelship.training.train import train

    best = train(config_from(TrainConfig, args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(best)
    return 0


def add_run_args(p: argparse.ArgumentParser) -> None:
    add_train_args(p, out_required=False)
    p.add_argument(
        "--out", type=Path, default=Path("runs/run"), metavar="DIR", help="run directory (default %(default)s)"
    )
    add_export_options(p, "export (the bundle is written to DIR/bundle, replacing an earlier one)")
    p.add_argument(
        "--min-accuracy",
        type=float,
        default=default(RunConfig, "min_accuracy"),
        metavar="ACC",
        help="fail (exit 1) when the shipped ONNX model's accuracy on the validation split is lower",
    )


def cmd_run(args: argparse.Namespace) -> int:
    cfg = RunConfig(
        train=config_from(TrainConfig, args),
        export=export_options(args),
        min_accuracy=args.min_accuracy,
        publish=args.publish,
    )
    try:
        result = run(cfg)
    except GateError as e:
        if isinstance(e.result, RunResult):  # what was built, then the reason it must not ship, last
            print_summary(e.result)
        raise
    if result is None:
        return 0  # a torchrun rank other than 0
    print_summary(result)
    print(
        f"modelship run: OK in {result.seconds:.0f}s, {result.accuracy_text}, every gate passed: {result.bundle.path}",
        file=sys.stderr,
    )
    return 0


def print_summary(result: RunResult) -> None:
    rows = result.summary()
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
