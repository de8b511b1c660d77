"""Eager model -> ONNX (dynamo exporter), torch.export .pt2 (both with a symbolic batch) and TorchScript (legacy:
script, trace as a guarded fallback)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelship.errors import ExportError

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"


@contextlib.contextmanager
def quiet(enabled: bool) -> Iterator[io.StringIO]:
    """Swallow everything printed, by Python and by C++ alike (fd 1 and 2), unless --verbose; yields the text."""
    text = io.StringIO()
    if not enabled:
        yield text
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile("w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield text
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            text.write(sink.read().decode(errors="replace"))


def _summary(e: BaseException) -> str:
    """The one line of a long exporter error that says what went wrong."""
    text = str(e)
    lines = [line.strip() for line in text.splitlines()]
    if "## Exception summary" in lines:
        after = [line for line in lines[lines.index("## Exception summary") + 1 :] if line]
        if after:
            text = after[0]
    else:
        text = next((line for line in lines if line), type(e).__name__)
    if "data-dependent" in text or "GuardOnDataDependent" in text:
        text += (
            " — the model branches on tensor values (data-dependent control flow); ONNX and pt2 export need "
            "torch.cond there, or export only TorchScript with --formats torchscript"
        )
    return text[:600]


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int, verbose: bool) -> dict[str, Any]:
    """Dynamo export with a symbolic batch dimension, saved as one self-contained file and fully checked."""
    import onnx

    batch = torch.export.Dim(BATCH_DIM, min=1)
    try:
        with quiet(not verbose), torch.no_grad():
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                dynamic_shapes=({0: batch},),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                verbose=verbose,
            )
            assert program is not None
            program.save(str(path), external_data=False)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"ONNX export failed: {_summary(e)} (run with --verbose for the exporter's log)") from None

    proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"the exported ONNX model fails onnx.checker: {str(e).splitlines()[0]}") from None
    for what, values in (("input", proto.graph.input), ("output", proto.graph.output)):
        dim = values[0].type.tensor_type.shape.dim[0]
        if not dim.dim_param:
            raise ExportError(
                f"the exported ONNX {what} {values[0].name!r} has a fixed batch dimension ({dim.dim_value}); expected "
                "a symbolic one. Does the model hard-code the batch size (e.g. x.view(2, -1))?"
            )
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    return {
        "opset": opsets.get("ai.onnx", opset),
        "batch_dim": proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param,
    }


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> dict[str, Any]:
    """torch.jit.script; torch.jit.trace only when scripting fails and the tracer raises no warning of its own."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit's deprecation notice
        try:
            scripted = torch.jit.script(model)
            method = "script"
        except Exception as script_error:
            reason = (
                str(script_error).strip().splitlines()[0] if str(script_error).strip() else type(script_error).__name__
            )
            log.info("torch.jit.script failed (%s); trying torch.jit.trace", reason)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    scripted = torch.jit.trace(model, example, check_trace=True)
                except Exception as e:
                    raise ExportError(f"TorchScript export failed: script: {reason}; trace: {_summary(e)}") from None
            tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
            if tracer:
                raise ExportError(
                    f"TorchScript export failed: torch.jit.script failed ({reason}) and torch.jit.trace warns the "
                    f"trace may be wrong for other inputs ({str(tracer[0].message).splitlines()[0]}); refusing a "
                    "traced artifact that could be wrong on another branch"
                ) from None
            method = "trace"
        scripted.save(str(path))
    return {"method": method}


def export_pt2(model: nn.Module, example: torch.Tensor, path: Path, verbose: bool) -> dict[str, Any]:
    """torch.export with a symbolic batch dimension, saved with torch.export.save; fails if the batch got fixed."""
    batch = torch.export.Dim(BATCH_DIM, min=1)
    try:
        with quiet(not verbose), torch.no_grad():
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as e:
        raise ExportError(f"torch.export failed: {_summary(e)} (run with --verbose for the exporter's log)") from None
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    user_input = placeholders[-1].meta["val"]  # parameters and buffers come first
    if isinstance(user_input.shape[0], int):
        raise ExportError(
            f"the exported pt2 program has a fixed batch dimension ({user_input.shape[0]}); expected a symbolic one. "
            "Does the model hard-code the batch size (e.g. x.view(2, -1))?"
        )
    torch.export.save(program, str(path))
    return {"batch_dim": str(user_input.shape[0])}
