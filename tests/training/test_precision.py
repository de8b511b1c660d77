"""--amp auto: bf16 only where a timed trial of the real model and batch measured it faster, and a resumed run
keeps the choice it was started with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modelship.training import runtime
from modelship.training.loop import step_trial
from modelship.training.models import build_model
from modelship.training.runtime import resolve_precision

CPU = torch.device("cpu")


def trial_of(seconds: dict[str, float]) -> tuple[list[str], object]:
    asked: list[str] = []

    def trial(dtype: torch.dtype | None) -> float:
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        asked.append(name)
        return seconds[name]

    return asked, trial


def test_auto_takes_bf16_only_where_the_trial_measured_it_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "native", lambda dtype, device: "AVX512-BF16")  # what both machines' flags said
    asked, faster = trial_of({"fp32": 1.0, "bf16": 0.6})
    chosen = resolve_precision("auto", CPU, faster)  # type: ignore[arg-type]
    assert chosen.dtype == torch.bfloat16 and asked == ["fp32", "bf16"]
    assert chosen.note == "bf16 autocast (AVX512-BF16; measured 1.67x fp32 on this model and batch)"
    _, slower = trial_of({"fp32": 1.0, "bf16": 1.3})  # the 2-core machine of the issue: 0.77x
    chosen = resolve_precision("auto", CPU, slower)  # type: ignore[arg-type]
    assert chosen.dtype is None
    assert chosen.note == "fp32 (bf16 on AVX512-BF16 measured 0.77x fp32 on this model and batch: not faster)"
    _, even = trial_of({"fp32": 1.0, "bf16": 0.97})  # within noise of fp32: not worth the precision
    assert resolve_precision("auto", CPU, even).dtype is None  # type: ignore[arg-type]
    asked, never = trial_of({"fp32": 1.0, "bf16": 0.5})
    resumed = resolve_precision("auto", CPU, never, reuse="fp32")  # type: ignore[arg-type]
    assert resumed.dtype is None and asked == [] and resumed.note == "fp32 (as the run being resumed chose)"


def test_the_trial_times_real_steps_and_leaves_the_model_and_every_rng_as_they_were() -> None:
    model = build_model("cnn", {"num_classes": 5, "in_channels": 3, "image_size": (32, 32), "width": 8})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    run = step_trial(model, (3, 32, 32), 16, CPU, channels_last=True)
    fp32, bf16 = run(None), run(torch.bfloat16)
    assert 0 < fp32 < 5 and 0 < bf16 < 5
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_deterministic_run_chooses_by_the_flags_without_a_timed_trial(
    tmp_path: Path, data_dir: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two identical --deterministic commands must train in the same precision; a trial's timing need not agree."""
    from modelship.training import train
    from tests.helpers import tiny_train_args

    def no_trial(*args: object) -> None:
        raise AssertionError("--deterministic timed a trial")

    monkeypatch.setattr(runtime, "native", lambda dtype, device: "AVX512-BF16")
    monkeypatch.setattr(train, "step_trial", no_trial)
    r = cli("train", "--epochs", "1", "--deterministic", "--out", tmp_path / "run", *tiny_train_args(data_dir))
    assert r.code == 0, r.err
    assert "bf16 autocast (AVX512-BF16; no timed trial)" in r.err


def test_a_run_records_its_choice_and_a_resume_keeps_it(
    tmp_path: Path, data_dir: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelship.training import train
    from tests.helpers import tiny_train_args

    monkeypatch.setattr(runtime, "native", lambda dtype, device: "AVX512-BF16")
    monkeypatch.setattr(train, "step_trial", lambda *a: trial_of({"fp32": 1.0, "bf16": 0.5})[1])
    out = tmp_path / "run"
    r = cli("train", "--epochs", "1", "--out", out, *tiny_train_args(data_dir))
    assert r.code == 0 and "bf16 autocast (AVX512-BF16; measured 2.00x fp32 on this model and batch)" in r.err
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["amp"] == "bf16"
    # the machine now measures the other way; the resumed run keeps what the run was trained in
    monkeypatch.setattr(train, "step_trial", lambda *a: trial_of({"fp32": 0.5, "bf16": 1.0})[1])
    r = cli("train", "--epochs", "2", "--out", out, "--resume", out / "checkpoints" / "last.pt",
            *tiny_train_args(data_dir))  # fmt: skip
    assert r.code == 0 and "bf16 (as the run being resumed chose)" in r.err
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["amp"] == "bf16"
    assert json.loads((out / "config.json").read_text())["amp"] == "auto"
