"""The main job end to end: `modelship run` on the defaults, its gate, and the bundle it writes, served."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelship import repository
from modelship.errors import BundleError, GateError, ParityError
from modelship.export.config import ExportOptions
from modelship.manifest import check_bundle
from modelship.pipeline import RunConfig, RunResult, run
from modelship.training.checkpoint import load_checkpoint
from modelship.training.config import TrainConfig
from tests.helpers import REPO, Result, Server, free_port, run_modelship, running_server, tiny_train_args


def make_run_flags() -> list[str]:
    """The flags `make run` gives `modelship run`, read from the Makefile (its --out left out)."""
    recipe = re.search(r"^\t\$\(BIN\)/modelship run (.*) \$\(RUN_ARGS\)$", (REPO / "Makefile").read_text(), re.M)
    assert recipe is not None, "the Makefile's run recipe"
    flags = recipe.group(1).split()
    at = flags.index("--out")
    return flags[:at] + flags[at + 2 :]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Result, Path]:
    """The README's main job as `make run` runs it: the real command with the Makefile's flags (shapes, cnn, 5 epochs,
    the fp16 and int8 variants, the accuracy floor)."""
    out = tmp_path_factory.mktemp("quickstart")
    r = run_modelship("run", "--out", str(out), *make_run_flags(), "--data-dir", str(data_dir), timeout=600)
    return r, out


def test_the_readme_shows_the_summary_the_quickstart_prints(quickstart: tuple[Result, Path]) -> None:
    """The Quickstart's sample table and last line, row by row, with every number as # (they vary by machine)."""
    r, out = quickstart
    readme = (REPO / "README.md").read_text()
    block = re.search(r"`make run` ends with this table.*?```text\n(.*?)```", readme, re.S)
    assert block is not None, "the Quickstart's sample output"

    def shape(line: str) -> str:
        return re.sub(r"\d+", "#", line.replace(str(out), "runs/quickstart"))

    printed = [*r.out.strip().splitlines(), r.last_line]
    assert [shape(line) for line in printed] == [shape(line) for line in block.group(1).strip().splitlines()]


def test_defaults_reach_95_percent_and_pass_parity(quickstart: tuple[Result, Path]) -> None:
    r, out = quickstart
    assert r.code == 0, r.err[-3000:]
    table = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in r.out.strip().splitlines())
    assert table["model"].startswith("cnn") and table["epochs"].startswith("5 of 5")
    assert float(table["accuracy"].split()[0]) >= 0.95  # the shipped ONNX file's, which the gate compares
    assert table["accuracy"].endswith("/500 validation images, the shipped onnx model)")
    assert "training's own pass" in table["best val_acc"]
    assert all("parity PASS" in table[k] for k in ("onnx", "torchscript", "pt2"))
    assert table["parity"].startswith("PASS (24 checks + 2 variant gates")  # 3 artifacts x 4 batches x random+real
    for variant in ("onnx-fp16", "onnx-int8"):
        agreement = float(re.search(r"top-1 agreement ([\d.]+)", table[variant]).group(1))  # type: ignore[union-attr]
        assert agreement >= 0.97 and table[variant].endswith("on onnxruntime-cpu  PASS")
    sizes = {k: float(re.search(r"(\d+) KiB", table[k]).group(1)) for k in ("onnx", "onnx-int8")}  # type: ignore[union-attr]
    assert sizes["onnx-int8"] < 0.4 * sizes["onnx"]  # int8 weights: about a quarter of fp32
    assert table["bundle"] == str(out / "bundle")
    assert table["serve it"] == f"modelship serve {out / 'bundle'}"
    assert r.last_line.startswith("modelship run: OK in ") and "every gate passed" in r.last_line
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["metrics"]["val_acc"] >= 0.95
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert manifest["name"] == "shapes-cnn" and manifest["parity"]["passed"]
    assert {v["artifact"] for v in manifest["parity"]["variants"]} == {"onnx-fp16", "onnx-int8"}
    assert manifest["artifacts"]["onnx-int8"]["calibration"]["source"].startswith("the checkpoint's training split")


@pytest.fixture(scope="module")
def served(quickstart: tuple[Result, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    _, out = quickstart
    with running_server(out / "bundle", tmp=tmp_path_factory.mktemp("served")) as s:
        yield s


def test_the_trained_model_served_labels_validation_pngs(served: Server, data_dir: Path) -> None:
    pngs = []
    for cls in ("circle", "cross", "ring", "square", "triangle"):
        pngs += [(cls, p) for p in sorted(data_dir.glob(f"shapes-*/val/{cls}/*.png"))[:6]]
    r = run_modelship("predict", "--url", served.url, *(str(p) for _, p in pngs))
    assert r.code == 0, r.err
    labels = [line.split("\t")[1] for line in r.out.strip().splitlines()]
    correct = sum(label == cls for (cls, _), label in zip(pngs, labels, strict=True))
    assert correct >= 27, f"{correct}/30 served predictions right"


def test_a_run_under_its_floor_never_ships_nor_replaces_the_bundle_that_passed(
    tmp_path: Path, data_dir: Path, cli
) -> None:
    args = ["--epochs", "1", *tiny_train_args(data_dir), "--formats", "onnx"]
    assert cli("run", "--out", tmp_path, *args).code == 0
    shipped = (tmp_path / "bundle" / "manifest.json").read_bytes()
    repo = tmp_path / "repo"
    r = cli("run", "--out", tmp_path, "--force", "--min-accuracy", "0.99", *args, "--publish", repo)
    assert r.code == 1
    assert re.fullmatch(
        r"modelship run: error: accuracy [\d.]+ \(\d+/25 validation images, the shipped onnx model\) is under "
        r"--min-accuracy 0.99",
        r.last_line,
    ), r.last_line
    assert (tmp_path / "bundle" / "manifest.json").read_bytes() == shipped  # the bundle that passed stays
    failed = tmp_path / "bundle.failed"
    assert sorted(p.name for p in failed.iterdir()) == ["manifest.json", "model.onnx", "parity.json", "reference.json"]
    manifest = json.loads((failed / "manifest.json").read_text())
    floor = r.last_line.removeprefix("modelship run: error: ")
    assert manifest["passed"] is False and manifest["parity"]["passed"] is True
    assert [(g["gate"], g["passed"]) for g in manifest["gates"]] == [("parity", True), ("min-accuracy", False)]
    assert manifest["gates"][1]["detail"] == floor and manifest["gates"][1]["min_accuracy"] == 0.99
    assert re.search(rf"^do not ship\s+{re.escape(str(failed))} failed min-accuracy: kept to inspect", r.out, re.M)
    assert "serve it" not in r.out and re.search(r"^min accuracy\s+0.99 \(--min-accuracy\)  FAIL$", r.out, re.M)
    assert not repo.exists()  # nothing published
    page = (tmp_path / "report.html").read_text()  # the report is written when the gate refuses, too
    assert '<span class="badge fail">FAIL</span>' in page and "is under --min-accuracy 0.99" in page
    assert 'href="bundle.failed/manifest.json"' in page

    # serve, triton and --publish refuse it, in one line naming the gate and its figures
    refusal = f"bundle {failed} failed its gates and must not ship: min-accuracy: {floor}"
    served = run_modelship("serve", str(failed), "--port", str(free_port()), timeout=60)
    assert served.code == 2 and served.last_line == f"modelship serve: error: {refusal}", served.err[-2000:]
    r = cli("serve", tmp_path)  # the run's folder: its bundle is what serves
    assert r.code == 2 and r.last_line == (
        f"modelship serve: error: {tmp_path} is a run's folder, not a bundle or a model repository; pass its bundle, "
        f"{tmp_path / 'bundle'}"
    )
    r = cli("triton", failed, "--out", tmp_path / "triton")
    assert r.code == 2 and r.last_line == f"modelship triton: error: {refusal}" and not (tmp_path / "triton").exists()
    with pytest.raises(BundleError) as refused:
        repository.publish(failed, repo)
    assert str(refused.value) == refusal and not (repo / "shapes-cnn").exists()

    r = cli("run", "--out", tmp_path, "--force", *args)  # the next run that passes takes its place
    assert r.code == 0 and not failed.exists() and (tmp_path / "bundle" / "manifest.json").read_bytes() != shipped


def test_parity_gate_fails_naming_the_artifact(tmp_path: Path, data_dir: Path, cli) -> None:
    # zero tolerance: ONNX Runtime's float rounding differs from eager PyTorch in the last bits
    r = cli("run", "--out", tmp_path, "--epochs", "1", *tiny_train_args(data_dir), "--atol", "0", "--rtol", "0")
    assert r.code == 1
    assert r.last_line.startswith(
        "modelship run: error: parity failed, the model must not ship: onnx on onnxruntime-cpu"
    )
    assert "torchscript on" not in r.last_line  # scripted TorchScript is bit-exact
    assert "parity        FAIL" in r.out


def test_usage_errors_exit_2(tmp_path: Path, data_dir: Path, cli) -> None:
    r = cli("run", "--out", tmp_path, "--epochs", "0", *tiny_train_args(data_dir))
    assert r.code == 2 and r.last_line == "modelship run: error: --epochs must be at least 1, got 0"
    r = cli("run", "--out", tmp_path, "--min-accuracy", "95", *tiny_train_args(data_dir))
    assert r.code == 2 and r.last_line == "modelship run: error: --min-accuracy must be between 0 and 1, got 95.0"
    assert not (tmp_path / "bundle").exists()


def test_run_is_a_plain_function_whose_gates_raise_the_project_errors(tmp_path: Path, data_dir: Path) -> None:
    train = TrainConfig(
        out=tmp_path, epochs=1, shapes_train=100, shapes_val=25, model_kwargs={"width": 8}, device="cpu",
        data_dir=data_dir,
    )  # fmt: skip
    with pytest.raises(ParityError) as failed:
        run(RunConfig(train, ExportOptions(formats=("onnx",), atol=0, rtol=0)))
    assert str(failed.value).startswith("parity failed, the model must not ship: onnx on onnxruntime-cpu at batch")
    result = failed.value.result
    assert isinstance(result, RunResult) and result.bundle.path == tmp_path / "bundle.failed"
    assert not result.bundle.passed and not result.passed and not (tmp_path / "bundle").exists()

    with pytest.raises(GateError) as low:  # --force: the run just made is replaced
        run(RunConfig(dataclasses.replace(train, force=True), ExportOptions(formats=("onnx",)), min_accuracy=0.999))
    assert not isinstance(low.value, ParityError)
    right, n = low.value.result.shipped
    assert str(low.value) == (
        f"accuracy {right / n:.4f} ({right}/{n} validation images, the shipped onnx model) "
        "is under --min-accuracy 0.999"
    )
    assert low.value.result.bundle.passed and low.value.result.bundle.manifest["name"] == "shapes-cnn"
    assert not low.value.result.passed and low.value.result.bundle.path == tmp_path / "bundle.failed"


def report_tables(page: str) -> list[list[list[str]]]:
    """Every table of an HTML page as rows of cell texts (tags stripped)."""
    tables = []
    for body in re.findall(r"<table[^>]*>(.*?)</table>", page, re.S):
        rows = []
        for row in re.findall(r"<tr>(.*?)</tr>", body, re.S):
            rows.append(
                [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]
            )
        tables.append(rows)
    return tables


def test_the_run_report_shows_the_numbers_of_its_files(quickstart: tuple[Result, Path]) -> None:
    r, out = quickstart
    assert re.search(r"^report\s+" + re.escape(str(out / "report.html")) + "$", r.out, re.M)
    page = (out / "report.html").read_text()
    assert '<span class="badge pass">PASS</span>' in page and "<svg" in page
    ev = json.loads((out / "evaluation.json").read_text())
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tables = report_tables(page)
    epochs = next(t for t in tables if t[0][:2] == ["epoch", "train loss"])
    keys = ("train_loss", "val_loss", "train_acc", "val_acc")
    best = max(history, key=lambda h: h["val_acc"])["epoch"]  # the first epoch with the highest val_acc
    expected = [[f"{h['epoch']} (best)" if h["epoch"] == best else str(h["epoch"]), *(f"{h[k]:.4f}" for k in keys)]
                for h in history]  # fmt: skip
    assert [row[:5] for row in epochs[1:]] == expected
    confusion = next(t for t in tables if t[0][0] == "true \\ predicted")
    assert [[int(v) for v in row[1:-1]] for row in confusion[1:]] == ev["confusion_matrix"]
    per_class = next(t for t in tables if t[0] == ["class", "precision", "recall", "f1", "support"])
    assert per_class[1:] == [[c, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"])]
                             for c, m in ev["per_class"].items()]  # fmt: skip
    # the headline is the shipped ONNX file on the validation split, in exact counts (the training pass, under its
    # own precision, may differ on a near-tie image: it is labelled as its own)
    right = sum(row[i] for i, row in enumerate(ev["confusion_matrix"]))
    assert ev["backend"] == "onnx" and ev["n"] == 500 and ev["accuracy"] == right / 500
    assert f"{right}/500 validation images, the shipped onnx model" in page and f"{right / 500:.4f}" in page
    assert f"{right}/500 validation images" in r.out
    assert {c["backend"] for c in ev["comparisons"]} == {"onnx-fp16", "onnx-int8"}
    for link in re.findall(r'href="(bundle/[^"]+)"', page):
        assert (out / link).is_file(), link
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "adamw lr 0.003, onecycle schedule" in page  # the optimiser's default lr as a number, not "default"


def test_run_publishes_only_a_model_that_passed_every_gate(tmp_path: Path, data_dir: Path, cli) -> None:
    repo = tmp_path / "repo"
    train = ["--epochs", "1", *tiny_train_args(data_dir), "--formats", "onnx", "--name", "shapes", "--publish", repo]
    r = cli("run", "--out", tmp_path / "refused", "--min-accuracy", "0.99", *train)
    assert r.code == 1 and "is under --min-accuracy 0.99" in r.last_line
    assert not repo.exists()
    r = cli("run", "--out", tmp_path / "shipped", *train)
    assert r.code == 0, r.err
    version = repo / "shapes" / "1"
    assert re.search(rf"^published\s+version 1 of shapes: {re.escape(str(version))}$", r.out, re.M), r.out
    assert re.search(rf"^serve it\s+modelship serve {re.escape(str(version))}$", r.out, re.M)
    assert check_bundle(version)["name"] == "shapes" and sorted(p.name for p in (repo / "shapes").iterdir()) == ["1"]
