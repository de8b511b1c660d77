"""The `modelship` command: parses flags, builds a config, calls the pipeline or a stage, prints, maps errors to exit
codes. Nothing else: what a command does lives in the function it calls, so tests and scripts call the same thing.

Heavy libraries (torch, onnx, litserve) are imported inside the command functions, so `modelship --help` stays fast.
"""

from __future__ import annotations

import argparse
import difflib
import gc
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from modelship.cli.export import add_export_args, add_triton_args, add_verify_args, cmd_export, cmd_triton, cmd_verify
from modelship.cli.monitor import add_monitor_args, cmd_monitor
from modelship.cli.serve import (
    add_evaluate_args,
    add_predict_args,
    add_serve_args,
    cmd_evaluate,
    cmd_predict,
    cmd_serve,
)
from modelship.cli.train import add_run_args, add_train_args, cmd_run, cmd_train
from modelship.errors import ModelshipError

log = logging.getLogger("modelship")

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: list[Command] = [
    ("run", "train, export and check parity in one go: the main job and the CI gate", add_run_args, cmd_run),
    ("train", "train a classifier and write state_dict checkpoints", add_train_args, cmd_train),
    (
        "export",
        "export a checkpoint to ONNX and TorchScript, check parity, write a bundle",
        add_export_args,
        cmd_export,
    ),
    ("verify", "re-check a bundle's hashes and parity (e.g. after a runtime upgrade)", add_verify_args, cmd_verify),
    (
        "triton",
        "write a Triton model repository and a KServe InferenceService for a bundle",
        add_triton_args,
        cmd_triton,
    ),
    ("serve", "serve a bundle over HTTP: /predict and KServe v2, dynamic batching", add_serve_args, cmd_serve),
    (
        "predict",
        "classify image files and folders: with a server, or offline with a bundle",
        add_predict_args,
        cmd_predict,
    ),
    (
        "evaluate",
        "measure a bundle's artifacts on a labelled folder: accuracy, confusion, per class",
        add_evaluate_args,
        cmd_evaluate,
    ),
    (
        "monitor",
        "the drift report of a payload log against the bundle's reference: a page to read after an alert",
        add_monitor_args,
        cmd_monitor,
    ),
]


class Parser(argparse.ArgumentParser):
    """argparse with the project's error form: `modelship COMMAND: error: ...` on one line and exit 2, a close match
    suggested for a misspelled flag or command; the usage only with --help."""

    def error(self, message: str) -> NoReturn:
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            message += did_you_mean(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
        self.exit(2, f"{self.prog}: error: {message}\n")

    def unrecognized(self, extra: list[str]) -> NoReturn:
        """The error for arguments this (sub)parser does not take, naming the first and its nearest flag."""
        flags = [s for a in self._actions for s in a.option_strings]
        first = extra[0].split("=", 1)[0]
        hint = did_you_mean(first, flags) if first.startswith("-") else ""
        what = "argument" if len(extra) == 1 else "arguments"
        self.error(f"unrecognized {what}: {' '.join(extra)}{hint}; see {self.prog} --help")


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def build_parser() -> Parser:
    import modelship

    parser = Parser(prog="modelship", description="Train -> export -> serve for PyTorch image classifiers.")
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
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command's own parser, which knows its flags
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        commands[args.command].unrecognized(extra)
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
    except BrokenPipeError:  # `modelship predict ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def console() -> int:
    """The `modelship` console command and `python -m modelship.cli`: `main`, then a short exit. The interpreter's
    exit runs garbage collections over every object still alive (~200,000 once torch is imported), 0.4-0.6 s of each
    command's end on 2 cores; frozen, the collections skip them and the memory goes back with the process. (Python
    promises no finalizer of an object still alive at exit; what modelship writes is closed before `main` returns.)"""
    code = main()
    gc.freeze()
    return code
