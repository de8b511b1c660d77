"""The server the serving tests share: the tiny shapes bundle, served with the default settings, and again with the
model inside the API servers (--in-process): every test of it holds for both."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Server, running_server


@pytest.fixture(scope="session", params=[(), ("--in-process",)], ids=["workers", "in-process"])
def server(
    request: pytest.FixtureRequest, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The tiny shapes bundle served with default settings, with inference workers or with the model in-process."""
    with running_server(tiny_bundle, *request.param, tmp=tmp_path_factory.mktemp("server")) as s:
        yield s
