"""Long runs: continued to more epochs, re-run into the same folder, replaced on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers import tiny_train_args


def test_a_run_continued_to_more_epochs_replans_its_schedule_for_every_kind(
    tmp_path: Path, data_dir: Path, cli
) -> None:
    for schedule in ("onecycle", "cosine", "step"):
        out = tmp_path / schedule
        args = [*tiny_train_args(data_dir), "--schedule", schedule]
        assert cli("train", "--epochs", "2", "--out", out, *args).code == 0
        r = cli("train", "--epochs", "4", "--out", out, "--resume", out / "checkpoints" / "last.pt", *args)
        assert r.code == 0, r.err[-2000:]
        assert "re-planned for 4, from step" in r.err
        state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
        assert state["epoch"] == 4 and [h["epoch"] for h in state["history"]] == [1, 2, 3, 4]
        assert json.loads((out / "config.json").read_text())["epochs"] == 4
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
        # from the step it resumed at, the learning rate is the one a run planned for 4 epochs has there
        straight = tmp_path / f"{schedule}-straight"
        assert cli("train", "--epochs", "4", "--out", straight, *args).code == 0
        planned = [json.loads(line)["lr"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
        assert [row["lr"] for row in rows[2:]] == planned[2:]


def test_a_second_run_into_the_same_folder_is_refused_unless_forced_and_touches_nothing(
    tmp_path: Path, data_dir: Path, cli
) -> None:
    out = tmp_path / "run"
    assert cli("train", "--epochs", "1", "--out", out, *tiny_train_args(data_dir)).code == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    r = cli("train", "--epochs", "1", "--out", out, *tiny_train_args(data_dir))
    assert r.code == 2 and r.last_line == (
        f"modelship train: error: --out {out} already holds a run (checkpoints, metrics.jsonl, tensorboard, "
        f"config.json); continue it with --resume {out / 'checkpoints' / 'last.pt'}, replace it with --force, "
        "or pick another --out"
    )
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    r = cli("run", "--epochs", "1", "--out", out, *tiny_train_args(data_dir))
    assert r.code == 2 and "already holds a run" in r.last_line
    assert cli("train", "--epochs", "2", "--out", out, "--force", *tiny_train_args(data_dir)).code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]  # the new run only: nothing of the replaced one is left
    assert len(list((out / "tensorboard").iterdir())) == 1


def test_the_run_summary_and_report_show_every_epoch_that_ran_with_the_best_marked(
    tmp_path: Path, data_dir: Path, cli
) -> None:
    # a learning rate this small changes no prediction: val_acc never improves on epoch 1, which stays the best
    args = [*tiny_train_args(data_dir), "--lr", "1e-12", "--formats", "onnx"]
    r = cli("run", "--epochs", "3", "--out", tmp_path / "run", *args)
    assert r.code == 0, r.err[-2000:]
    table = dict(line.split(None, 1) if not line.startswith("best") else ("best val_acc", line[12:].strip())
                 for line in r.out.strip().splitlines())  # fmt: skip
    assert table["epochs"].startswith("3 of 3") and "(epoch 1," in table["best val_acc"]
    page = (tmp_path / "run" / "report.html").read_text()
    assert "<td>1 (best)</td>" in page and "<td>2</td>" in page and "<td>3</td>" in page
    assert "epoch 1 of 3" in page


def test_resume_of_the_wrong_thing_says_what_it_is_and_what_to_give(
    tmp_path: Path, data_dir: Path, tiny_run: Path, tiny_bundle: Path, cli
) -> None:
    last = tiny_run / "checkpoints" / "last.pt"
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(last.read_bytes()[:5000])
    bare = tmp_path / "weights.pt"
    torch.save(torch.load(last, weights_only=True)["state_dict"], bare)
    onnx = tiny_bundle / "model.onnx"
    cases = {
        tiny_run: f"--resume {tiny_run} is a folder; expected a checkpoint file, e.g. {last}",
        onnx: "is an ONNX export, not a training checkpoint; resume from RUN_DIR/checkpoints/last.pt",
        truncated: "a file cut short (a full disk, an interrupted copy) reads like this: resume from another",
        bare: f"is a bare state_dict (weights only): it holds no optimizer, schedule or epoch to resume; start a new "
        f"run from its weights with --init-from {bare}",
    }
    for path, message in cases.items():
        r = cli("train", "--epochs", "3", "--out", tmp_path / "r", "--resume", path, *tiny_train_args(data_dir))
        assert r.code == 2 and message in r.last_line and "Traceback" not in r.err, r.last_line
        assert len(r.err.strip().splitlines()) == 1, r.err
        assert not (tmp_path / "r").exists()


def test_resume_on_another_folder_with_the_same_class_names_is_refused(tmp_path: Path, cli) -> None:
    from tests.helpers import write_folder

    for name, seed in (("first", 0), ("second", 1)):
        write_folder(tmp_path / name, {"a": 6, "b": 6}, size=(16, 16), seed=seed)
    args = ["--device", "cpu", "--model-kwargs", '{"width": 8}']
    out = tmp_path / "run"
    assert cli("train", "--data", tmp_path / "first", "--epochs", "1", "--out", out, *args).code == 0
    r = cli("train", "--data", tmp_path / "second", "--epochs", "2", "--out", out, "--resume",
            out / "checkpoints" / "last.pt", *args)  # fmt: skip
    assert r.code == 2 and "Their class names match, but the run's history would mix two validation sets" in r.last_line
    assert str(tmp_path / "first") in r.last_line and str(tmp_path / "second") in r.last_line
