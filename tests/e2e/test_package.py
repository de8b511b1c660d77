"""The distribution as pip builds it: one `modelship` package in the wheel, installable, nothing at the top level."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
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


def installed(wheel: Path, venv: Path) -> Path:
    """A fresh virtual environment with the wheel installed, alone (no dependencies: tests stay offline)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index"]
    subprocess.run([*pip, "-q", str(wheel)], check=True)
    return venv


def test_installed_in_a_fresh_venv_the_stages_are_subpackages(wheel: Path, tmp_path: Path) -> None:
    venv = installed(wheel, tmp_path / "venv")
    python = venv / "bin" / "python"
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


def base_dependencies() -> list[str]:
    """The distributions `pip install modelship` brings: pyproject's [project] dependencies, by name."""
    import re

    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0] for d in deps]


def offline_site(folder: Path) -> Path:
    """A folder holding exactly the base dependencies, as they are installed here (their top-level packages and
    metadata linked): what `pip install .` adds to a fresh environment, without the network tests may not use."""
    import importlib.metadata

    folder.mkdir()
    for name in base_dependencies():
        dist = importlib.metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    return folder


def test_the_base_install_runs_the_client_and_predict_url(wheel: Path, tmp_path: Path, affine_bundle: Path) -> None:
    """`pip install modelship` (no extras) is the CLI, the Python client and the shared preprocessing: it calls a
    running server with `modelship predict --url`, and `import modelship.client` works, with nothing of the server's
    (pydantic, litserve, onnxruntime, grpc) to lean on."""
    from PIL import Image

    from tests.helpers import running_server

    venv = installed(wheel, tmp_path / "venv")
    python = venv / "bin" / "python"
    site = next((venv / "lib").glob("python3.*/site-packages"))
    (site / "base-dependencies.pth").write_text(f"{offline_site(tmp_path / 'deps')}\n")
    server_side = ("pydantic_core", "litserve", "onnxruntime", "grpc", "torch")
    probe = f"import importlib.util as u; print([m for m in {server_side!r} if u.find_spec(m)])"
    run = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert (run.returncode, run.stdout.strip()) == (0, "[]"), run.stderr  # the server's libraries are not here
    image = tmp_path / "x.png"
    Image.fromarray(np.array([[10, 200], [30, 40]], np.uint8), "L").save(image)  # the brightest pixel is class b
    with running_server(affine_bundle, tmp=tmp_path) as s:
        predict = [venv / "bin" / "modelship", "predict", "--url", s.url, image]
        r = subprocess.run(predict, capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.startswith(f"{image}\tb\t"), r.stdout
        client = f"import modelship.client as c; print(c.Client({s.url!r}).predict_image({str(image)!r})['label'])"
        r = subprocess.run([python, "-c", client], capture_output=True, text=True, cwd=tmp_path)
        assert (r.returncode, r.stdout.strip()) == (0, "b"), r.stderr[-3000:]
