"""Hard edges: API key, payload limit, timeouts, a crashed worker, SIGTERM, and bundles the server must refuse."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from modelship.files import sha256_file
from tests.helpers import KEY, busy_port, free_port, run_modelship, running_server, scrape, wait_ready


def predict(url: str, **kwargs) -> httpx.Response:
    return httpx.post(url + "/predict", json={"inputs": np.zeros((3, 32, 32)).tolist()}, timeout=60, **kwargs)


def test_api_key_guards_every_route_but_health(tiny_bundle: Path, tmp_path: Path) -> None:
    with running_server(tiny_bundle, "--max-payload-mb", "0.05", env={"MODELSHIP_API_KEY": KEY}, tmp=tmp_path) as s:
        assert 503 in s.health_seen and s.health_seen[-1] == 200  # 503 while warming up, then 200
        for method, path in (
            ("POST", "/predict"),
            ("GET", "/info"),
            ("GET", "/metrics"),
            ("GET", "/v2"),
            ("GET", "/v2/models/shapes-cnn"),
            ("POST", "/v2/models/shapes-cnn/infer"),
            ("POST", "/v2/models/shapes-cnn/predict"),
            ("POST", "/v2/repository/index"),
            ("POST", "/v2/repository/models/shapes-cnn/unload"),
        ):
            r = httpx.request(method, s.url + path)
            assert r.status_code == 401, path
            assert r.json() == {"error": "missing or wrong API key; send it as X-API-Key or Authorization: Bearer"}
            assert httpx.request(method, s.url + path, headers={"X-API-Key": "wrong"}).status_code == 401
        assert predict(s.url, headers={"X-API-Key": KEY}).status_code == 200
        assert predict(s.url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.post(s.url + "/v2/repository/index", headers={"X-API-Key": KEY}).json()[0]["state"] == "READY"
        for path in ("/health", "/v2/health/live", "/v2/health/ready"):
            assert httpx.get(s.url + path).status_code == 200
        # the payload limit applies too, and before the body is read
        r = httpx.post(
            s.url + "/predict", content=b"x" * 60_000, headers={"X-API-Key": KEY, "content-type": "application/json"}
        )
        assert r.status_code == 413 and "52428 byte payload limit" in r.json()["error"]
        metrics = scrape(s.url, headers={"X-API-Key": KEY})
        assert metrics['modelship_requests_total{route="/predict",status="401"}'] == 2
        assert metrics['modelship_requests_total{route="/predict",status="413"}'] == 1


MODES = pytest.mark.parametrize("mode", [(), ("--in-process",)], ids=["workers", "in-process"])


@MODES
def test_request_timeout_is_504_and_the_server_stays_healthy(tiny_bundle: Path, tmp_path: Path, mode) -> None:
    with running_server(tiny_bundle, "--timeout", "0.002", "--batch-timeout", "0", *mode, tmp=tmp_path) as s:
        x = np.zeros((64, 3, 32, 32), np.float32)
        doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        r = httpx.post(s.url + "/v2/models/shapes-cnn/infer", json=doc, timeout=30)
        assert r.status_code == 504 and "no answer within the 0.002s request timeout" in r.json()["error"]
        assert httpx.get(s.url + "/health").status_code == 200


RACE = """
import os, sys, tempfile, threading, time
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp()
from modelship.serving import metrics as m
real = m.traffic_metrics
def slow():  # both threads are inside the creation at once, as an in-process server's two threads were
    time.sleep(0.3)
    return real()
m.traffic_metrics = slow
start, got, errors = threading.Barrier(2), [], []
def first():
    start.wait()
    try:
        got.append(m.metrics())
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=first) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print(errors, len(got), len({id(g) for g in got}))
"""


def test_two_threads_asking_for_the_metrics_first_share_one_set() -> None:
    """The race behind a 500 where a 504 was due: an in-process server's request handler and its batching thread both
    created the metric objects, and prometheus_client refused the second registration."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})  # fmt: skip
    assert out.stdout.strip() == "[] 2 1", out.stdout + out.stderr


def test_a_crashed_worker_is_replaced_and_the_server_keeps_answering(tiny_bundle: Path, tmp_path: Path) -> None:
    with running_server(tiny_bundle, tmp=tmp_path) as s:
        assert predict(s.url).status_code == 200
        workers = s.children()
        assert len(workers) == 2
        for worker in workers:  # both, so no survivor can answer for them
            os.kill(worker, signal.SIGKILL)
        time.sleep(0.1)  # their connections are gone, LitServe's monitor has not noticed yet: nothing goes to them
        statuses = [predict(s.url).status_code for _ in range(3)]  # queued until the replacements are up
        assert statuses == [200, 200, 200], s.output()[-3000:]
        replacements = s.children()
        assert len(replacements) == 2 and not set(replacements) & set(workers)
        deadline = time.monotonic() + 30
        while httpx.get(s.url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(s.url + "/health").status_code == 200
        assert s.proc.poll() is None


@MODES
def test_sigterm_lets_in_flight_requests_finish_and_exits_0_leaving_no_files(
    tiny_bundle: Path, tmp_path: Path, mode
) -> None:
    scratch = tmp_path / "tmp"  # the server's temporary directory: its model table, sockets and metric files
    scratch.mkdir()
    # a long batch window keeps requests in flight when the signal arrives
    with running_server(tiny_bundle, "--batch-timeout", "1.0", "--max-batch-size", "64", *mode, tmp=tmp_path,
                        env={"TMPDIR": str(scratch)}) as s:  # fmt: skip
        assert ours(scratch) == ["modelship-metrics", "modelship-sock"]
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(predict, s.url) for _ in range(8)]
            time.sleep(0.3)
            s.proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers] + [s.output()[-3000:]]
        # answered while draining: each tells its client not to send more on that connection
        assert [r.headers.get("connection") for r in answers] == ["close"] * 8
        assert s.proc.wait(timeout=40) == 0
        assert "Traceback" not in s.output()
    assert ours(scratch) == []


@MODES
def test_a_crashed_api_server_is_replaced_and_the_server_keeps_answering(
    tiny_bundle: Path, tmp_path: Path, mode
) -> None:
    with running_server(tiny_bundle, *mode, tmp=tmp_path) as s:
        assert predict(s.url).status_code == 200
        crashed = s.api_servers()
        assert len(crashed) == 2
        for pid in crashed:  # both, so every answer below comes from a replacement
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while set(s.api_servers()) & set(crashed) or len(s.api_servers()) < 2:
            assert time.monotonic() < deadline, s.output()[-3000:]
            time.sleep(0.1)
        wait_ready(s.url, s.proc, s.log, [])
        assert [predict(s.url).status_code for _ in range(6)] == [200] * 6  # new connections, spread over both
        assert s.output().count("died with exit code -9; starting a new one") == 2
        assert s.proc.poll() is None


@MODES
def test_a_model_that_cannot_be_loaded_stops_the_server_in_one_line(tiny_bundle: Path, tmp_path: Path, mode) -> None:
    def unloadable(m: dict, d: Path) -> None:  # hashes that match, content ONNX Runtime cannot read
        (d / "model.onnx").write_bytes(b"not an onnx model")
        m["artifacts"]["onnx"] |= {"sha256": sha256_file(d / "model.onnx"), "bytes": 17}

    bundle = copy_bundle(tiny_bundle, tmp_path / "b", unloadable)
    r = run_modelship("serve", str(bundle), "--port", str(free_port()), *mode, timeout=120)
    assert r.code == 2, r.err[-3000:]
    assert r.last_line == (
        f"modelship serve: error: bundle {bundle} (shapes-cnn/1) cannot be served: onnx artifact model.onnx: not an "
        "ONNX file (ONNX Runtime: [ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from model.onnx "
        "failed:Protobuf parsing failed.)"
    )
    assert "Traceback" not in r.err, r.err[-3000:]


def ours(directory: Path) -> list[str]:
    """modelship's temporary directories in `directory`, without their random suffix."""
    return sorted(p.name.rsplit("-", 1)[0] for p in directory.glob("modelship-*"))


def copy_bundle(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        manifest = json.loads((dst / "manifest.json").read_text())
        edit(manifest, dst)
        (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _unknown_version(m: dict, d: Path) -> None:
    m["version"] = 3


def _failed_parity(m: dict, d: Path) -> None:
    failed = "onnx on onnxruntime-cpu at batch 7 (random inputs): max_abs_err 0.3"
    m["parity"].update(passed=False, failed=[failed])
    m["gates"][0].update(passed=False, detail=failed)
    m["passed"] = False


def _no_torchscript(m: dict, d: Path) -> None:
    del m["artifacts"]["torchscript"]


@pytest.mark.parametrize(
    ("edit", "extra", "message"),
    [
        (None, ["--port", "80"], "--port must be between 1024 and 65535, got 80"),
        (None, ["--host", "example.com"], "--host must be one of 127.0.0.1, 0.0.0.0, ::"),
        (_unknown_version, [], "is bundle version 3; this modelship reads versions 1, 2"),
        (_failed_parity, [], "failed its gates and must not ship: parity: onnx on onnxruntime-cpu at batch 7"),
        (_no_torchscript, ["--backend", "torchscript"], "has no torchscript artifact (it has onnx, pt2)"),
    ],
    ids=["port", "host", "version", "parity", "backend"],
)
def test_serve_refuses_bad_bundles_and_flags_before_starting(
    tiny_bundle: Path, tmp_path: Path, cli, edit, extra, message: str
) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "b", edit)
    r = cli("serve", bundle, *extra)
    assert r.code == 2 and r.last_line.startswith("modelship serve: error: ") and message in r.last_line


def test_serve_refuses_a_tampered_artifact(tiny_bundle: Path, tmp_path: Path, cli) -> None:
    bundle = copy_bundle(tiny_bundle, tmp_path / "b")
    with open(bundle / "model.onnx", "ab") as f:
        f.write(b"\0")
    r = cli("serve", bundle)
    assert r.code == 2 and "does not match its manifest: onnx artifact model.onnx: sha256" in r.last_line
    assert (
        sha256_file(bundle / "model.torchscript.pt")
        == json.loads((bundle / "manifest.json").read_text())["artifacts"]["torchscript"]["sha256"]
    )


def test_serve_refuses_a_busy_port(tiny_bundle: Path, cli) -> None:
    with busy_port() as port:
        r = cli("serve", tiny_bundle, "--port", str(port))
    assert r.code == 2 and f"cannot listen on 127.0.0.1:{port}" in r.last_line


def test_serve_refuses_a_temporary_directory_too_long_for_unix_sockets(
    tiny_bundle: Path, tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / ("t" * 120)
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # what TMPDIR sets
    r = cli("serve", tiny_bundle)
    assert r.code == 2 and "too long a path for the server's Unix sockets" in r.last_line
    assert "set TMPDIR to a shorter one" in r.last_line and ours(scratch) == []


def test_missing_bundle(tmp_path: Path, cli) -> None:
    r = cli("serve", tmp_path / "nope")
    assert r.code == 2
    assert r.last_line == (
        f"modelship serve: error: {tmp_path / 'nope'} is not a folder; "
        "expected a bundle or a model repository REPO/<name>/<version>/"
    )


def test_a_request_a_dying_worker_held_is_answered_by_its_replacement(tiny_bundle: Path, tmp_path: Path) -> None:
    # one worker that holds requests for 1.5 s while it gathers a batch: kill it while it holds them
    args = ("--workers-per-device", "1", "--batch-timeout", "1.5", "--max-batch-size", "64")
    with running_server(tiny_bundle, *args, tmp=tmp_path) as s:
        (worker,) = s.children()
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(predict, s.url) for _ in range(4)]
            time.sleep(0.5)
            os.kill(worker, signal.SIGKILL)
            answers = [f.result() for f in futures]
        assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
        assert "died holding 4 request(s); they go to the next worker" in s.output()
        (replacement,) = s.children()
        assert replacement != worker


def test_in_process_on_a_gpu_machine_is_refused_naming_the_way_out(
    tiny_bundle: Path, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelship.serving import server

    monkeypatch.setattr(server, "usable_gpus", lambda device: 0 if device == "cpu" else 1)  # as a GPU machine says
    r = cli("serve", tiny_bundle, "--in-process")
    assert r.code == 2 and "--in-process runs the model on the CPU" in r.last_line
    assert "add --device cpu, or leave out --in-process to serve on the GPU" in r.last_line
