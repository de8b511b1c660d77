"""The server the serving tests share: the tiny shapes bundle, served with the default settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Server, running_server


@pytest.fixture(scope="session")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The tiny shapes bundle served with default settings."""
    with running_server(tiny_bundle, tmp=tmp_path_factory.mktemp("server")) as s:
        yield s
