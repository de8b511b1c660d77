"""`modelship train`: the checkpoint contract, resume, crash safety, options and bad input."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modelship.allocator import glibc, tunes_malloc
from modelship.training.checkpoint import load_checkpoint
from modelship.training.config import TrainConfig
from modelship.training.data import DataRequest, load_data
from modelship.training.loaders import EpochSampler, class_weights
from modelship.training.models import build_model
from modelship.training.optim import make_optimizer, make_scheduler
from tests.helpers import REPO, pt_files, run_modelship, tiny_train_args, write_folder


def test_checkpoint_is_the_design_contract(tiny_run: Path) -> None:
    ckpt_dir = tiny_run / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "last.pt"]
    c = torch.load(ckpt_dir / "last.pt", map_location="cpu", weights_only=True)
    assert (c["format"], c["version"]) == ("modelship.checkpoint", 1)
    assert c["model"] == {
        "arch": "cnn",
        "kwargs": {"num_classes": 5, "in_channels": 3, "image_size": [32, 32], "width": 8},
    }
    assert c["data"]["classes"] == ["circle", "cross", "ring", "square", "triangle"]
    assert c["data"]["input_shape"] == [3, 32, 32] and len(c["data"]["mean"]) == len(c["data"]["std"]) == 3
    assert (c["epoch"], c["global_step"]) == (2, 4)  # 100 images / batch 64 = 2 steps per epoch
    assert set(c["metrics"]) >= {"val_acc", "val_loss"}
    assert {"optimizer", "scheduler", "scaler", "rng", "config", "versions"} <= set(c)
    assert c["config"]["epochs"] == 2 and isinstance(c["config"]["out"], str)
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in c["state_dict"])
    # the file alone rebuilds the model
    model = build_model(c["model"]["arch"], c["model"]["kwargs"])
    model.load_state_dict(c["state_dict"])


def test_metrics_jsonl_and_tensorboard_events(tiny_run: Path) -> None:
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "samples_per_s"}
    assert all(0 <= r["val_acc"] <= 1 and r["samples_per_s"] > 0 for r in rows)
    assert list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))
    best = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    assert best["metrics"]["val_acc"] == max(r["val_acc"] for r in rows)


def _epoch_of(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


@pytest.mark.parametrize("cache", ["auto", "off"], ids=["decoded", "pil"])
def test_killed_run_resumed_gives_the_same_weights_bit_for_bit(tmp_path: Path, data_dir: Path, cli, cache: str) -> None:
    # --deterministic: where bf16 is native, --amp auto then decides by the flags, not by a trial whose timing could
    # differ between the two runs
    args = ["--epochs", "4", "--deterministic",
            *tiny_train_args(data_dir, "--shapes-train", "600", "--seed", "5", "--data-cache", cache)]  # fmt: skip
    # the run that dies: SIGKILL as soon as its second epoch is on disk
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelship.cli", "train", "--out", str(killed), *args],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while _epoch_of(killed / "checkpoints" / "last.pt") < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    stopped_at = _epoch_of(killed / "checkpoints" / "last.pt")
    assert 2 <= stopped_at < 4, "the run must be killed part-way"
    assert cli("train", "--out", killed, "--resume", killed / "checkpoints" / "last.pt", *args).code == 0
    straight = tmp_path / "straight"
    assert cli("train", "--out", straight, *args).code == 0

    a = load_checkpoint(killed / "checkpoints" / "last.pt")
    b = load_checkpoint(straight / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["history"][-1]["val_loss"] == b["history"][-1]["val_loss"]
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


WRITER = """
import sys, torch
from pathlib import Path
from modelship.training.checkpoint import atomic_torch_save
path = Path(sys.argv[1])
v = 0
while True:
    v += 1
    atomic_torch_save({"v": v, "t": torch.full((4_000_000,), float(v))}, path)
    print(v, flush=True)
"""


def test_sigkill_at_any_moment_never_leaves_a_torn_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    for i in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert proc.stdout is not None
        proc.stdout.readline()  # one whole write done
        time.sleep(0.011 * i)  # land at different points of the next writes
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        c = torch.load(path, weights_only=True)
        assert torch.equal(c["t"], torch.full((4_000_000,), float(c["v"]))), f"torn file after kill {i}"


def test_epochs_are_a_function_of_seed_and_epoch_only() -> None:
    s = EpochSampler(10, seed=1, shuffle=True)
    s.set_epoch(3)
    first = list(s)
    s.set_epoch(0)
    list(s)
    s.set_epoch(3)
    assert list(s) == first and sorted(first) == list(range(10))
    shards = [EpochSampler(10, seed=1, shuffle=True, rank=r, world_size=3) for r in range(3)]
    for sh in shards:
        sh.set_epoch(3)
    drawn = [i for sh in shards for i in sh]
    # 10 images on 3 ranks: padded to 12 by wrapping, so every image is drawn and exactly 2 twice
    assert all(len(list(sh)) == 4 for sh in shards) and set(drawn) == set(range(10)) and len(drawn) == 12
    val = [EpochSampler(10, seed=1, shuffle=False, rank=r, world_size=3, pad=False) for r in range(3)]
    assert sorted(i for sh in val for i in sh) == list(range(10))  # every validation image exactly once


def test_balanced_sampler_draws_classes_equally() -> None:
    targets = [0] * 900 + [1] * 100
    s = EpochSampler(1000, seed=0, shuffle=True, weights=class_weights(targets))
    drawn = [targets[i] for i in s]
    assert 400 < drawn.count(1) < 600


def _lrs(cfg: TrainConfig, steps: int = 10) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt, steps)
    lrs = []
    for _ in range(cfg.epochs * steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_schedules_with_warmup(tmp_path: Path) -> None:
    cos = _lrs(TrainConfig(out=tmp_path, epochs=4, lr=1.0, warmup_epochs=1, schedule="cosine"))
    assert cos[0] == pytest.approx(0.1) and cos[9] == pytest.approx(1.0)  # linear warm-up over the first epoch
    assert cos[10] == pytest.approx(1.0) and cos[-1] < 0.01  # then cosine to zero
    assert all(a >= b for a, b in itertools.pairwise(cos[9:]))
    step = _lrs(TrainConfig(out=tmp_path, epochs=4, lr=1.0, schedule="step", step_size=2, gamma=0.5, optimizer="sgd"))
    assert step[0] == step[19] == 1.0 and step[20] == step[39] == 0.5
    one = _lrs(TrainConfig(out=tmp_path, epochs=4, lr=1.0, schedule="onecycle", warmup_epochs=1, optimizer="adam"))
    assert max(one) == pytest.approx(1.0) and one.index(max(one)) in (9, 10) and one[0] < 0.1 and one[-1] < 1e-3


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_the_optimizers_step_as_torchs_own(tmp_path: Path, name: str) -> None:
    cfg = TrainConfig(out=tmp_path, optimizer=name, lr=0.05, weight_decay=0.01)
    results = []
    for ours in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                    torch.nn.Linear(36, 3))  # fmt: skip
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        opt = make_optimizer(cfg, model)
        if not ours:  # torch's own class, with the same groups and hyper-parameters
            opt.__class__ = type(opt).__mro__[1]
        for _ in range(3):
            opt.zero_grad()
            model(torch.ones(2, 1, 5, 5)).pow(2).sum().backward()
            opt.step()
        results.append((torch.cat([p.detach().flatten() for p in model.parameters()]), opt.state_dict()))
    (ours_w, ours_state), (torch_w, torch_state) = results
    assert torch.equal(ours_w, torch_w) and not torch.equal(ours_w, start)  # they stepped, and alike
    assert str(ours_state) == str(torch_state)  # the same checkpoint contents, so resumes mix freely


PROBE = "import sys; from modelship.cli import main; code = main(sys.argv[1:]); print(sorted(m for m in sys.modules if m.startswith('torch._dynamo'))[:1]); sys.exit(code)"  # noqa: E501


def test_training_never_imports_torch_compile_stack(tmp_path: Path) -> None:
    """torch.optim imports torch._dynamo on an optimizer's first use (1.5 s of a start-up on 2 cores); train and
    resume never need it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-c", PROBE, "train", *tiny_train_args(tmp_path / "data"), "--out", str(tmp_path / "r")]
    for extra in (["--epochs", "1"], ["--epochs", "2", "--resume", str(tmp_path / "r/checkpoints/last.pt")]):
        proc = subprocess.run([*base, *extra], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == "[]", proc.stdout


FAULTS = """
import json, resource, sys
from modelship.cli import main
from modelship.training import train
faults, epoch = [], train.train_one_epoch
def counted(*args, **kwargs):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = epoch(*args, **kwargs)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out
train.train_one_epoch = counted
code = main(sys.argv[1:])
print(json.dumps(faults))
sys.exit(code)
"""


@pytest.mark.skipif(not glibc(), reason="glibc's malloc")
def test_epochs_after_the_first_fault_in_no_fresh_memory(tmp_path: Path) -> None:
    """Each step frees and allocates the same activations; glibc's malloc handed them back to the kernel and faulted
    them in again, zeroed, page by page (7,000 faults a step of the small cnn at batch 64, ~10% of its time)."""
    env = {k: v for k, v in os.environ.items() if not tunes_malloc(k)}  # so the training process tunes it
    args = ["train", "--shapes-train", "512", "--shapes-val", "32", "--device", "cpu", "--epochs", "5",
            "--batch-size", "64", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "r")]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", FAULTS, *args], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**env, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    faults = json.loads(proc.stdout.splitlines()[-1])  # per epoch of 8 steps
    # without it 40,000-100,000 in every epoch; with it none once the heaps have grown to the step's peak, or a few
    # 2 MB pieces (up to 2,560 faults seen; on one machine in every epoch)
    assert len(faults) == 5 and min(faults[1:]) < 5_000, faults


def test_early_stopping_stops_after_patience_epochs(tmp_path: Path, data_dir: Path, cli) -> None:
    r = cli("train", "--out", tmp_path, "--epochs", "6", "--lr", "1e-12", "--patience", "2", *tiny_train_args(data_dir))
    assert r.code == 0
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3  # epoch 1 sets the best, epochs 2 and 3 do not improve
    assert "early stopping: val_acc has not improved for 2 epochs" in r.err


@pytest.mark.parametrize(
    "extra",
    [
        [
            "--optimizer",
            "sgd",
            "--schedule",
            "step",
            "--clip-grad",
            "1.0",
            "--label-smoothing",
            "0.1",
            "--balanced-sampler",
            "--amp",
            "bf16",
            "--deterministic",
        ],
        [
            "--optimizer",
            "adam",
            "--schedule",
            "onecycle",
            "--warmup-epochs",
            "0.5",
            "--amp",
            "fp16",
            "--clip-grad",
            "0.5",
            "--no-augment",
            "--data-cache",
            "off",
        ],
    ],
    ids=["sgd-step-bf16", "adam-onecycle-fp16"],
)
def test_optimisation_options_train(tmp_path: Path, data_dir: Path, cli, extra: list[str]) -> None:
    r = cli("train", "--out", tmp_path, "--epochs", "2", *tiny_train_args(data_dir, *extra))
    assert r.code == 0, r.err
    c = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert c["config"]["amp"] in ("bf16", "fp16") and math.isfinite(c["metrics"]["val_loss"])
    if "fp16" in extra:
        assert c["scaler"]["scale"] > 0  # the GradScaler's state is saved for resuming
    assert all(torch.isfinite(v).all() for v in c["state_dict"].values() if v.is_floating_point())


def test_init_from_and_freeze_backbone_train_only_the_new_head(tmp_path: Path, tiny_ckpt: Path, cli) -> None:
    write_folder(tmp_path / "pets", {"cat": 8, "dog": 8}, size=(32, 32))
    r = cli(
        "train", "--data", tmp_path / "pets", "--init-from", tiny_ckpt, "--freeze-backbone", "--epochs", "1",
        "--out", tmp_path / "run", "--model-kwargs", '{"width": 8}', "--device", "cpu",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert "reinitialised (missing or other shape): classifier.2.bias, classifier.2.weight" in r.err
    assert "--freeze-backbone: training only classifier.2.weight, classifier.2.bias" in r.err
    before = load_checkpoint(tiny_ckpt)["state_dict"]
    after = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state_dict"]
    assert torch.equal(before["features.0.0.weight"], after["features.0.0.weight"])  # frozen
    assert after["classifier.2.weight"].shape == (2, 32)


def test_compiled_model_saves_plain_parameter_names(tmp_path: Path, data_dir: Path, cli) -> None:
    r = cli("train", "--out", tmp_path, "--epochs", "1", "--compile", "aot_eager", *tiny_train_args(data_dir))
    assert r.code == 0, r.err
    keys = list(load_checkpoint(tmp_path / "checkpoints" / "last.pt")["state_dict"])
    assert keys and all("_orig_mod" not in k for k in keys)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "modelship.cli", "train",
         "--out", str(out), "--epochs", "2", *tiny_train_args(data_dir, "--shapes-val", "25")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == [str(out / "checkpoints" / "best.pt")]  # rank 0 alone prints
    assert proc.stderr.count("epoch 2/2") == 1  # and logs
    c = load_checkpoint(out / "checkpoints" / "last.pt")
    assert all(not k.startswith("module.") for k in c["state_dict"])
    # the reported val_acc is over all 25 validation images exactly once, summed across both ranks
    model = build_model(c["model"]["arch"], c["model"]["kwargs"]).eval()
    model.load_state_dict(c["state_dict"])
    val = load_data(DataRequest(name="shapes", data_dir=data_dir, shapes_train=100, shapes_val=25)).val
    with torch.no_grad():
        correct = sum(int(model(x[None]).argmax(1).item() == y) for x, y in val)
    assert c["metrics"]["val_acc"] == pytest.approx(correct / 25)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--lr", "-0.1"], "--lr must be positive, got -0.1"),
        (["--model", "vgg"], "unknown model 'vgg'; expected one of cnn, mlp, mobilenet_v3_small, resnet18"),
        (["--data", "imagenet"], "unknown dataset 'imagenet'; expected one of shapes, mnist, fashion-mnist, cifar10"),
        (["--data", "/nonexistent/folder"], "data folder /nonexistent/folder does not exist"),
        (["--compile", "nonsense"], "--compile nonsense: unknown torch.compile backend"),
    ],
)
def test_bad_flags_give_one_line_and_exit_2_with_no_checkpoint(
    tmp_path: Path, data_dir: Path, cli, flags, message
) -> None:
    out = tmp_path / "out"
    r = cli("train", "--out", out, "--epochs", "1", *tiny_train_args(data_dir), *flags)
    assert r.code == 2
    assert r.last_line == f"modelship train: error: {message}" or (
        r.last_line.startswith("modelship train: error: ") and message in r.last_line
    )
    assert "Traceback" not in r.err
    assert pt_files(out) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path: Path, data_dir: Path, cli) -> None:
    r = cli("train", "--out", tmp_path / "o", *tiny_train_args(data_dir), "--device", "cuda")
    assert r.code == 2 and "--device cuda but no CUDA device is usable here" in r.last_line
    assert pt_files(tmp_path / "o") == []


def test_out_that_is_a_file(tmp_path: Path, data_dir: Path, cli) -> None:
    (tmp_path / "file").write_text("x")
    r = cli("train", "--out", tmp_path / "file", *tiny_train_args(data_dir))
    assert (
        r.code == 2
        and r.last_line
        == f"modelship train: error: --out {tmp_path / 'file'} is a file; expected a directory for the run "
        "(it is created if missing)"
    )


def test_resume_from_another_architecture_or_data_shape(tmp_path: Path, data_dir: Path, tiny_ckpt: Path, cli) -> None:
    r = cli(
        "train",
        "--out",
        tmp_path / "a",
        "--epochs",
        "3",
        "--resume",
        tiny_ckpt,
        *tiny_train_args(data_dir),
        "--model",
        "mlp",
        "--model-kwargs",
        "{}",
    )
    assert r.code == 2 and f"--resume {tiny_ckpt} holds cnn" in r.last_line and "this run builds mlp" in r.last_line
    r = cli(
        "train",
        "--out",
        tmp_path / "b",
        "--epochs",
        "3",
        "--resume",
        tiny_ckpt,
        *tiny_train_args(data_dir),
        "--image-size",
        "16,16",
    )
    assert r.code == 2 and "was trained on input [3, 32, 32]" in r.last_line and "gives [3, 16, 16]" in r.last_line
    r = cli("train", "--out", tmp_path / "c", "--epochs", "2", "--resume", tiny_ckpt, *tiny_train_args(data_dir))
    assert r.code == 2 and "has already completed 2 epochs; --epochs is the total" in r.last_line
    assert pt_files(tmp_path) == []


def test_argument_errors_from_the_real_command(tmp_path: Path) -> None:
    r = run_modelship("train", "--out", str(tmp_path), "--epochs", "three")
    assert r.code == 2 and "argument --epochs: invalid int value: 'three'" in r.err and "Traceback" not in r.err
    r = run_modelship("train", "--out", str(tmp_path), "--model-kwargs", "{width: 3}")
    assert r.code == 2 and "argument --model-kwargs: not valid JSON" in r.err
    r = run_modelship("train", "--out", str(tmp_path), "--resume", str(tmp_path / "nope.pt"))
    assert (
        r.code == 2
        and r.last_line == f"modelship train: error: --resume {tmp_path / 'nope.pt'} does not exist or is not a file"
    )


def _output_through_a_terminal(args: list[str]) -> str:
    """Run the command with a pseudo-terminal as stdout/stderr, as a person at a shell would."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child
        os.chdir(REPO)
        os.environ["PYTHONPATH"] = str(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "modelship.cli", *args])
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_plain_lines_otherwise(tmp_path: Path, data_dir: Path) -> None:
    args = ["train", "--epochs", "1", *tiny_train_args(data_dir, "--shapes-train", "300")]
    on_tty = _output_through_a_terminal([*args, "--out", str(tmp_path / "tty")])
    piped = run_modelship(*args, "--out", str(tmp_path / "pipe"))
    assert "━" in on_tty and "\x1b[" in on_tty  # rich's bar, drawn with terminal escapes
    assert "━" not in piped.err and "\x1b[" not in piped.err
    assert "epoch 1/1  train_loss" in on_tty and "epoch 1/1  train_loss" in piped.err
