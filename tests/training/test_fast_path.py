"""The fast training path: decoded data cached by content, whole-batch augmentation, and the precision chosen for the
hardware — each with the guarantees of the per-sample path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modelship.preprocess import Preprocess
from modelship.training import runtime
from modelship.training.cache import cache_key, decode_files
from modelship.training.checkpoint import load_checkpoint
from modelship.training.loaders import crop_and_flip
from modelship.training.runtime import resolve_precision
from tests.helpers import pt_files, tiny_train_args, write_folder


def test_batch_augmentation_is_a_reflect_padded_window_maybe_flipped_and_seeded() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    g = torch.Generator().manual_seed(3)
    out = crop_and_flip(x, g)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")  # pad = min(8, 8) // 8 = 1
    for i in range(2):
        windows = [padded[i, :, r : r + 8, c : c + 8] for r in range(3) for c in range(3)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    again = crop_and_flip(x, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # a function of the generator's seed: resume sees the same batches
    flips = [crop_and_flip(x[:1], torch.Generator().manual_seed(s)) for s in range(40)]
    assert any(not torch.equal(f, flips[0]) for f in flips)


def test_the_cache_is_keyed_by_content_and_rebuilt_when_corrupt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_folder(tmp_path / "d", {"a": 3, "b": 3}, size=(8, 6))
    files = sorted(str(p) for p in (tmp_path / "d").rglob("*.png"))
    pre = Preprocess(size=(6, 8), channels=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    first, how = decode_files(files, pre, tmp_path / "cache")
    assert how == "decoded and cached" and first.shape == (6, 6, 8, 3) and first.dtype == np.uint8
    again, how = decode_files(files, pre, tmp_path / "cache")
    assert how == "cache hit" and np.array_equal(again, first)
    for record in (tmp_path / "cache").glob("stat-*.json"):  # the record of the files' stats, torn: read them again
        record.write_text('{"val')
    again, how = decode_files(files, pre, tmp_path / "cache")
    assert how == "cache hit" and np.array_equal(again, first)
    key = cache_key(files, pre)
    assert cache_key(files, Preprocess(size=(6, 6), channels=3, mean=(0,) * 3, std=(1,) * 3)) != key  # the size
    write_folder(tmp_path / "d", {"a": 1}, size=(8, 6), seed=9)  # rewrites a/0.png with other pixels
    assert cache_key(files, pre) != key  # changed data is never reused
    changed, how = decode_files(files, pre, tmp_path / "cache")
    assert how == "decoded and cached" and not np.array_equal(changed, first)
    entry = tmp_path / "cache" / cache_key(files, pre)
    (entry / "images.npy").write_bytes((entry / "images.npy").read_bytes()[:100])  # torn by a crash or a copy
    rebuilt, how = decode_files(files, pre, tmp_path / "cache")
    assert how == "decoded and cached" and np.array_equal(rebuilt, changed)
    assert f"decoded cache {entry} is corrupt or from other data" in caplog.text


def test_a_warm_start_opens_no_image_and_a_changed_file_is_looked_at_again(
    tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_folder(data, {"a": 6, "b": 6}, size=(16, 16))
    args = ["--data", data, "--epochs", "1", "--device", "cpu", "--cache-dir", cache, "--amp", "off"]
    first = cli("train", *args, "--out", tmp_path / "r1")
    assert first.code == 0 and "decoded and cached" in first.err, first.err
    opened: list[str] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    warm = cli("train", *args, "--out", tmp_path / "r2")
    assert warm.code == 0 and "cache hit" in warm.err and opened == []  # no header, no pixel read again
    same = [load_checkpoint(tmp_path / r / "checkpoints/last.pt")["data"] for r in ("r1", "r2")]
    assert same[0] == same[1]  # the same classes, size, channels and statistics as the run that looked
    (data / "a" / "3.png").write_bytes(b"not a png")  # a file changed since: its record no longer matches
    changed = cli("train", *args, "--out", tmp_path / "r3")
    assert changed.code == 2 and f"cannot read image {data / 'a' / '3.png'}" in changed.last_line
    assert str(data / "a" / "0.png") in opened  # every header was opened again


def test_decoded_and_pil_paths_train_alike(tmp_path: Path, data_dir: Path, cli) -> None:
    results = {}
    for cache in ("auto", "off"):
        out = tmp_path / cache
        r = cli("train", "--out", out, "--epochs", "3", "--amp", "off", "--data-cache", cache,
                *tiny_train_args(data_dir, "--shapes-train", "400", "--shapes-val", "100"))  # fmt: skip
        assert r.code == 0, r.err
        assert ("data decoded in RAM" in r.err) == (cache == "auto")
        results[cache] = [json.loads(line)["val_acc"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the same data, model and augmentation family; the draws differ, so accuracy is close, not equal
    assert abs(results["auto"][-1] - results["off"][-1]) <= 0.15, results


def test_the_first_line_says_what_was_chosen(
    tmp_path: Path, data_dir: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = cli("train", "--out", tmp_path / "a", "--epochs", "1", *tiny_train_args(data_dir))
    assert r.code == 0 and "channels_last" in r.err
    native = runtime.native("bf16", torch.device("cpu"))
    if native is None:
        assert "fp32 (no native bf16" in r.err
    else:  # a timed trial decided, and the line says what it measured and took
        found = re.search(
            rf"(bf16 autocast|fp32) \((?:bf16 on )?{native};? measured ([0-9.]+)x fp32 on this model", r.err
        )
        assert found, r.err
        took_bf16, ratio = found.group(1) == "bf16 autocast", float(found.group(2))
        assert ratio >= runtime.FASTER if took_bf16 else ratio <= runtime.FASTER
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset())  # a CPU without native bf16
    assert resolve_precision("auto", torch.device("cpu")).note.startswith("fp32 (no native bf16 on this cpu")
    r = cli("train", "--out", tmp_path / "b", "--epochs", "1", "--amp", "bf16", *tiny_train_args(data_dir))
    assert r.code == 0  # asked for explicitly: no silent fall-back, but a clear line
    assert "--amp bf16: this cpu has no native bf16, so it is emulated and likely slower than --amp off" in r.err
    assert "bf16 autocast (emulated)" in r.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bad_cache_flags_are_one_line_exit_2(tmp_path: Path, data_dir: Path, cli) -> None:
    r = cli("train", "--out", tmp_path / "o", "--data-cache", "gpu", *tiny_train_args(data_dir))
    assert r.code == 2 and r.last_line == (
        "modelship train: error: --data-cache gpu needs a CUDA device (training runs on the CPU here); use ram or auto"
    )
    (tmp_path / "file").write_text("not a folder")  # unwritable below it, even for root
    r = cli("train", "--out", tmp_path / "o", "--cache-dir", tmp_path / "file" / "cache", *tiny_train_args(data_dir))
    assert r.code == 2 and r.last_line.startswith(
        f"modelship train: error: --cache-dir {tmp_path / 'file' / 'cache'} is not writable ("
    )
    assert pt_files(tmp_path / "o") == []


@pytest.mark.gpu
def test_on_cuda_the_data_lives_on_the_gpu_and_checkpoints_stay_portable(tmp_path: Path, data_dir: Path, cli) -> None:
    r = cli("train", "--out", tmp_path / "g", "--epochs", "2", "--data-cache", "gpu",
            *tiny_train_args(data_dir, "--device", "cuda"))  # fmt: skip
    assert r.code == 0, r.err
    assert "data decoded on the GPU" in r.err
    # --amp auto: bf16 where a trial measured it faster, else fp32 saying why
    assert any(f in r.err for f in ("bf16 autocast (CUDA sm_", "fp32 (bf16 on CUDA sm_", "fp32 (no native bf16"))
    ckpt = torch.load(tmp_path / "g" / "checkpoints" / "last.pt", weights_only=True)
    assert {t.device.type for t in ckpt["state_dict"].values()} == {"cpu"}
    rows = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(row["train_loss"]) for row in rows)
