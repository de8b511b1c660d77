"""Session fixtures: one tiny shapes dataset and one tiny trained checkpoint serve every test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from modelship.cli import main
from tests.helpers import Result, Server, running_server, tiny_train_args


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dataset cache every test shares (shapes is written once, on first use)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run `modelship ARGS` in this process and capture what it prints."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own usage errors: still one line on stderr, checked like ours
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A 2-epoch tiny cnn run on shapes: its run directory."""
    out = tmp_path_factory.mktemp("tiny_run")
    code = main(["train", "--epochs", "2", "--out", str(out), *tiny_train_args(data_dir)])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_run: Path) -> Path:
    return tiny_run / "checkpoints" / "last.pt"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Path:
    """The tiny checkpoint exported to ONNX + TorchScript; read-only for tests (copy it to tamper)."""
    out = tmp_path_factory.mktemp("bundles") / "shapes-cnn"
    assert main(["export", str(tiny_ckpt), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A small cnn trained well enough that its predictions mean something (about 0.8 val_acc, 200 steps)."""
    out = tmp_path_factory.mktemp("trained_run")
    args = tiny_train_args(data_dir, "--shapes-train", "800", "--shapes-val", "100", "--batch-size", "16")
    assert main(["train", "--epochs", "4", "--out", str(out), *args]) == 0
    return out / "checkpoints" / "best.pt"


@pytest.fixture(scope="session")
def variant_bundle(tmp_path_factory: pytest.TempPathFactory, trained_ckpt: Path) -> Path:
    """The trained checkpoint exported with every format and both variants; read-only for tests.

    The gate is loosened for this half-trained model (its near-ties flip under int8 more than a trained model's do);
    the quickstart test holds the real defaults to a fully trained one."""
    out = tmp_path_factory.mktemp("variant_bundles") / "shapes-cnn"
    gate = ["--int8-min-agreement", "0.8", "--max-accuracy-drop", "0.08"]
    assert main(["export", str(trained_ckpt), "--out", str(out), "--variants", "fp16,int8", *gate]) == 0
    return out


def export_affine(d: Path, model: torch.nn.Module, factory: str = "affine_identity", classes: str = "a,b,c,d",
                  formats: tuple[str, ...] = ("--formats", "onnx")) -> Path:  # fmt: skip
    """`model` (tests.helpers:`factory`) exported as a bundle of the model `affine` in d/affine."""
    torch.save(model.state_dict(), d / "affine.pt")
    out = d / "affine"
    code = main([
        "export", str(d / "affine.pt"), "--out", str(out), "--model", f"tests.helpers:{factory}",
        "--input-shape", "1,2,2", "--classes", classes, "--max-batch", "16", *formats,
    ])  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="session")
def affine_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """logits = 2x + 1 over a [1, 2, 2] input: every answer shows exactly which input it belongs to."""
    from tests.helpers import affine_identity

    return export_affine(tmp_path_factory.mktemp("affine"), affine_identity(4), formats=())  # every exact format


def affine_3x() -> torch.nn.Module:
    """The affine model with weight 3 and bias 0: its answers differ from 2x + 1's, its top-1 is the same."""
    from tests.helpers import affine_identity

    model = affine_identity(4)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(0.0)
    return model


@pytest.fixture(scope="session")
def affine_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`affine_3x` exported: a version 2 that agrees with version 1 on every top-1."""
    return export_affine(tmp_path_factory.mktemp("affine-v2"), affine_3x())


@pytest.fixture(scope="session", params=[(), ("--in-process",)], ids=["workers", "in-process"])
def server(
    request: pytest.FixtureRequest, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The tiny shapes bundle served with default settings, with inference workers or with the model in-process:
    the server the serving tests (and the client's and predict's) share; every test of it holds for both."""
    with running_server(tiny_bundle, *request.param, tmp=tmp_path_factory.mktemp("server")) as s:
        yield s
