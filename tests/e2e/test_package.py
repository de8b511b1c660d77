"""The distribution as pip builds it: one `modelship` package in the wheel, installable, nothing at the top level."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src")  # a copy, so setuptools' build/ folder never lands in the checkout
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("modelship", "training", "export", "serving"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = out.glob("modelship-*.whl")
    return found


def test_the_wheel_holds_only_the_modelship_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"modelship", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for stage in ("training/train.py", "export/bundle.py", "serving/server.py", "cli/__main__.py"):
        assert f"modelship/{stage}" in names  # the linked folders are real files in the wheel
    assert not [n for n in names if "/tests/" in n or n.startswith(("benchmarks/", "tests/"))]


def test_installed_in_a_fresh_venv_the_stages_are_subpackages(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
    )
    probe = (
        "import importlib.util as u, modelship.training, modelship.export, modelship.serving\n"
        "print([m for m in ('training', 'export', 'serving') if u.find_spec(m)])"
    )
    run = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"  # no top-level training/export/serving packages
    version = subprocess.run([venv / "bin" / "modelship", "--version"], capture_output=True, text=True, cwd=tmp_path)
    import modelship

    assert version.returncode == 0 and version.stdout.strip() == f"modelship {modelship.__version__}"
    helped = subprocess.run([venv / "bin" / "modelship", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert helped.returncode == 0 and "serve" in helped.stdout  # the CLI runs with the base install alone
