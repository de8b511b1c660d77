"""Servers the serving tests share: the tiny shapes bundle served, and a fixed-weight bundle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from modelship.cli import main
from tests.helpers import Server, running_server


@pytest.fixture(scope="session")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The tiny shapes bundle served with default settings."""
    with running_server(tiny_bundle, tmp=tmp_path_factory.mktemp("server")) as s:
        yield s


@pytest.fixture(scope="session")
def affine_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """logits = 2x + 1 over a [1, 2, 2] input: every answer shows exactly which input it belongs to."""
    from tests.helpers import affine_identity

    d = tmp_path_factory.mktemp("affine")
    torch.save(affine_identity(4).state_dict(), d / "affine.pt")
    out = d / "affine"
    code = main([
        "export", str(d / "affine.pt"), "--out", str(out), "--model", "tests.helpers:affine_identity",
        "--input-shape", "1,2,2", "--classes", "a,b,c,d", "--max-batch", "16",
    ])  # fmt: skip
    assert code == 0
    return out
