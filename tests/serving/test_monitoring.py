"""After the release: the bundle's reference, live drift against it in a real server, the payload log, and the
offline report of the log (`modelship monitor`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from modelship import reference
from modelship.files import sha256_file
from modelship.manifest import read_manifest
from modelship.preprocess import Preprocess, preprocess_image
from modelship.training.checkpoint import load_checkpoint
from modelship.training.data import source_samples
from tests.helpers import Server, free_port, running_server, scrape

WINDOW = 100


def val_inputs(bundle: Path, ckpt: Path, brighten: int = 0) -> np.ndarray:
    """The bundle's own validation images (the reference's), brightened by `brighten` levels, preprocessed."""
    pre = Preprocess.from_dict(read_manifest(bundle)["preprocess"])
    images = [image.convert("RGB") for image, _ in source_samples(load_checkpoint(ckpt)["data"], "val", 10_000)]
    shifted = [Image.fromarray(np.clip(np.asarray(im, np.int16) + brighten, 0, 255).astype(np.uint8)) for im in images]
    return np.stack([preprocess_image(im, pre) for im in shifted])


def send(url: str, x: np.ndarray, n: int, per_request: int = 4) -> None:
    """`n` answers of the images of `x`, taken in turn, `per_request` to a v2 request."""
    picks = np.resize(np.arange(len(x)), n)
    for i in range(0, n, per_request):
        b = x[picks[i : i + per_request]]
        body = {"id": f"r{i}", "inputs": [{"name": "input", "shape": list(b.shape), "datatype": "FP32",
                                           "data": b.ravel().tolist()}]}  # fmt: skip
        assert httpx.post(url + "/v2/models/shapes-cnn/infer", json=body).status_code == 200


def drift_after(url: str, since: float, timeout: float = 15.0) -> dict:
    """The drift document of the first look the main process took after `since` (and after the windows' snapshot)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = httpx.get(url + "/v2/models/shapes-cnn/drift").json()
        if doc.get("time", 0) > since + 1.0:
            return doc
        time.sleep(0.2)
    raise AssertionError(f"no drift look after {since}: {doc}")


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[tuple[Server, Path]]:
    tmp = tmp_path_factory.mktemp("monitoring")
    logs = tmp / "payloads"
    args = ("--drift-window", str(WINDOW), "--log-payloads", str(logs), "--log-max-mb", "0.02")
    with running_server(tiny_bundle, *args, tmp=tmp) as s:
        yield s, logs


def test_the_bundle_carries_a_reference_measured_through_its_artifact(tiny_bundle: Path, tiny_ckpt: Path) -> None:
    manifest = read_manifest(tiny_bundle)
    entry = manifest["reference"]
    assert entry["sha256"] == sha256_file(tiny_bundle / "reference.json") and entry["artifact"] == "onnx"
    ref = reference.read(tiny_bundle, manifest)
    assert ref is not None and ref["classes"] == manifest["classes"] and ref["images"] == entry["images"] == 25
    x = val_inputs(tiny_bundle, tiny_ckpt)
    import onnxruntime as ort

    logits = ort.InferenceSession(str(tiny_bundle / "model.onnx")).run(None, {"input": x})[0]
    pred, conf = reference.top1(logits)
    assert ref["predicted"]["counts"] == np.bincount(pred, minlength=5).tolist()
    assert ref["confidence"]["mean"] == pytest.approx(conf.mean(), rel=1e-6)
    assert ref["input"]["channel_mean"] == pytest.approx(x.mean(axis=(0, 2, 3)).tolist(), rel=1e-5)
    assert ref["raw"]["width"]["0.5"] == 32.0 and sum(ref["labels"]["counts"]) == 25


def test_live_drift_is_ok_in_distribution_and_drift_when_shifted_and_equals_the_logs(
    logged: tuple[Server, Path], tiny_bundle: Path, tiny_ckpt: Path
) -> None:
    server, logs = logged
    url = server.url
    send(url, val_inputs(tiny_bundle, tiny_ckpt), WINDOW)  # the validation images again: in distribution
    doc = drift_after(url, time.time())
    assert (doc["status"], doc["window"]) == ("ok", {"size": WINDOW, "answers": WINDOW}), doc
    assert doc["figures"]["psi"] < 0.01 and max(doc["figures"]["channel_shift"]) < 0.05
    assert doc["thresholds"] == {"psi": [0.1, 0.25], "low_confidence": [0.1, 0.2], "shift": [0.25, 0.5]}
    send(url, val_inputs(tiny_bundle, tiny_ckpt, brighten=60), WINDOW)  # one window of brighter images
    doc = drift_after(url, time.time())
    assert doc["status"] == "drift" and doc["window"]["answers"] == WINDOW, doc
    assert any(r.startswith("largest input channel shift") for r in doc["reasons"])
    # the gauges say the same
    gauges = scrape(url)
    assert gauges['modelship_drift_status{model="shapes-cnn",version="1"}'] == 2
    assert gauges['modelship_drift_psi{model="shapes-cnn",version="1"}'] == pytest.approx(doc["figures"]["psi"])
    # and the figures are a numpy recomputation from the payload log: the last window is the bright requests'
    records = [json.loads(line) for path in sorted(logs.glob("*.jsonl")) for line in path.read_text().splitlines()]
    bright = sorted(records, key=lambda r: r["time"])[-WINDOW // 4 :]
    assert sum(len(r["answers"]) for r in bright) == WINDOW
    pred = np.array([a["index"] for r in bright for a in r["answers"]])
    conf = np.array([a["score"] for r in bright for a in r["answers"]])
    means = np.array([m for r in bright for m in r["input"]["channel_means"]])
    ref = reference.read(tiny_bundle, read_manifest(tiny_bundle))
    assert ref is not None
    again = reference.figures(ref, pred, conf, means)
    for key in ("psi", "mean_confidence", "low_confidence_share"):
        assert doc["figures"][key] == pytest.approx(again[key], abs=1e-9), key
    assert doc["figures"]["channel_shift"] == pytest.approx(again["channel_shift"], abs=1e-9)


def test_the_offline_report_reads_the_log_against_the_reference(
    logged: tuple[Server, Path], tiny_bundle: Path, tmp_path: Path, cli
) -> None:
    _, logs = logged
    r = cli("monitor", logs, "--bundle", tiny_bundle, "--out", tmp_path / "mon", "--window", str(WINDOW))
    assert r.code == 0, r.err
    assert r.out.startswith(f"shapes-cnn version 1: drift over the last {WINDOW} of ") and "input shift" in r.out
    doc = json.loads((tmp_path / "mon" / "monitor.json").read_text())
    v = doc["versions"]["1"]
    assert v["status"] == "drift" and v["answers"] >= 2 * WINDOW and len(v["periods"]) >= 2
    page = (tmp_path / "mon" / "report.html").read_text()
    assert "modelship monitor: shapes-cnn" in page and page.count("<svg") == 5
    assert 'badge fail">DRIFT<' in page and "drift over the last window: largest input channel shift" in page
    r = cli("monitor", logs, "--bundle", tmp_path / "nope")
    assert r.code == 2 and "nope" in r.last_line


def test_payload_logs_rotate_and_survive_a_sigterm_without_a_torn_line(logged: tuple[Server, Path]) -> None:
    server, logs = logged
    stop = threading.Event()

    def load() -> None:
        x = np.zeros((8, 3, 32, 32), np.float32).ravel().tolist()
        body = {"inputs": [{"name": "input", "shape": [8, 3, 32, 32], "datatype": "FP32", "data": x}]}
        with httpx.Client() as client:
            while not stop.is_set():
                try:
                    client.post(server.url + "/v2/models/shapes-cnn/infer", json=body, timeout=5)
                except httpx.HTTPError:
                    return  # the server went

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.kill(server.proc.pid, signal.SIGTERM)  # under load
    assert server.proc.wait(timeout=40) == 0
    stop.set()
    for t in threads:
        t.join()
    files = sorted(logs.glob("*.jsonl"))
    assert len(files) > 2  # rotated at --log-max-mb 0.02
    for path in files:
        data = path.read_bytes()
        assert data.endswith(b"\n") and all(json.loads(line)["model"] == "shapes-cnn" for line in data.splitlines())


def test_a_dead_sink_never_fails_a_request_and_what_it_drops_is_counted(tiny_bundle: Path, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/events"  # nothing listens
    with running_server(tiny_bundle, "--log-payloads", dead, tmp=tmp_path) as s:
        x = np.zeros((1, 3, 32, 32), np.float32).ravel().tolist()
        body = {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": x}]}
        started = time.monotonic()
        statuses = [httpx.post(s.url + "/v2/models/shapes-cnn/infer", json=body).status_code for _ in range(20)]
        assert statuses == [200] * 20 and time.monotonic() - started < 10  # never waits for the sink
        deadline = time.monotonic() + 30
        while scrape(s.url).get('modelship_payload_log_dropped_total{reason="sink"}', 0) < 1:
            assert time.monotonic() < deadline, s.output()[-2000:]
            time.sleep(0.5)
        assert "payload log: records dropped so far in this process, by reason: {'sink': " in s.output()


def test_bad_monitoring_input_is_one_clear_line(tiny_bundle: Path, tmp_path: Path, cli) -> None:
    # a reference that is not the bundle's (its hash fixed so only its content can tell)
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    ref = json.loads((bundle / "reference.json").read_text())
    ref["classes"] = ["a", "b", "c", "d", "e"]
    (bundle / "reference.json").write_text(json.dumps(ref))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["reference"]["sha256"] = sha256_file(bundle / "reference.json")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    r = cli("serve", bundle)
    assert r.code == 2 and r.last_line == (
        f"modelship serve: error: {bundle}/reference.json does not match its bundle (its classes or input channels "
        "differ from the manifest's); it was not written with this bundle: re-export"
    )
    r = cli("verify", bundle)
    assert r.code == 2 and "does not match its bundle" in r.last_line
    blocked = tmp_path / "file"
    blocked.write_text("")
    for args, message in [
        (("--log-payloads", str(blocked / "logs")), "--log-payloads"),
        (("--log-payloads", "ftp://example/x"), "expected a folder or an http(s):// URL"),
        (("--log-sample", "0"), "--log-sample must be a share of requests, above 0 and at most 1, got 0.0"),
        (("--drift-psi", "0.3,0.2"), "--drift-psi must be WARN,DRIFT with 0 < WARN < DRIFT, got 0.3,0.2"),
        (("--drift-window", "-1"), "--drift-window must be 0 (off) to 1000000, got -1"),
        (("--log-inputs",), "--log-inputs goes with --log-payloads DEST"),
    ]:
        r = cli("serve", tiny_bundle, *args)
        assert r.code == 2 and message in r.last_line, (args, r.last_line)
