"""argparse value types and the one source of every default: the stage's config dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any


def default(cls: type, name: str) -> Any:
    """The default of field `name` of config dataclass `cls`: flags never repeat a default."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING, f"{cls.__name__}.{name} has no default"
    return f.default_factory()


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


def pair(text: str) -> tuple[float, float]:
    """WARN,DRIFT: two numbers."""
    values = floats(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers WARN,DRIFT such as 0.1,0.25, got {text!r}")
    return values[0], values[1]


def names(text: str) -> tuple[str, ...]:
    vals = tuple(v.strip() for v in text.split(","))
    if any(not v for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated names without blanks, got {text!r}")
    return vals


def config_from(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """`cls(...)` from the parsed flags whose names are its fields, plus `given` (which wins)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**(values | given))
