"""Faults an operator meets: a hung worker, a killed main process, a restarting worker beside a serving one, slow
clients, oversized JSON, and the small edges of the HTTP surface. Real servers on loopback; every process a test
stops or kills is one its own server started."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import running_server

MODES = pytest.mark.parametrize("mode", [(), ("--in-process",)], ids=["workers", "in-process"])


def predict(url: str, timeout: float = 60) -> httpx.Response:
    return httpx.post(url + "/predict", json={"inputs": np.zeros((3, 32, 32)).tolist()}, timeout=timeout)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not yet reaped


def test_a_hung_worker_is_killed_replaced_and_what_it_held_is_answered(tiny_bundle: Path, tmp_path: Path) -> None:
    args = ("--workers-per-device", "1", "--hang-timeout", "1")
    with running_server(tiny_bundle, *args, tmp=tmp_path) as s:
        assert predict(s.url).status_code == 200  # a batch's time is known: milliseconds, so the floor (1 s) rules
        (worker,) = s.children()
        os.kill(worker, signal.SIGSTOP)  # alive, connected, and answering nothing
        try:
            start = time.monotonic()
            with ThreadPoolExecutor(3) as pool:
                answers = list(pool.map(lambda _: predict(s.url), range(3)))
            took = time.monotonic() - start
        finally:
            if alive(worker):
                os.kill(worker, signal.SIGCONT)
        assert [r.status_code for r in answers] == [200] * 3, [r.text for r in answers]
        assert "has held a batch for over 1.0 s; killing it, its requests go to the next worker" in s.output()
        assert not alive(worker)
        (replacement,) = s.children()
        assert replacement != worker
        assert took < 30, took  # the hang is noticed after 1 s, then a replacement loads and warms up


def test_health_stays_200_while_a_worker_restarts_beside_a_serving_one(tiny_bundle: Path, tmp_path: Path) -> None:
    with running_server(tiny_bundle, tmp=tmp_path) as s:
        deadline = time.monotonic() + 60
        while "ready: 2 copies of the model warmed up" not in s.output():  # /health is 200 once one is
            assert time.monotonic() < deadline, s.output()[-3000:]
            time.sleep(0.1)
        first, second = s.children()
        seen: list[int] = []
        stop = threading.Event()

        def probe() -> None:
            with httpx.Client(timeout=5) as client:
                while not stop.is_set():
                    seen.append(client.get(s.url + "/health").status_code)
                    time.sleep(0.02)

        watcher = threading.Thread(target=probe)
        watcher.start()
        try:
            os.kill(first, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while first in s.children() or len(s.children()) < 2:  # replaced, and the replacement up
                assert time.monotonic() < deadline, s.output()[-3000:]
                time.sleep(0.1)
            statuses = [predict(s.url).status_code for _ in range(4)]
            time.sleep(3)  # the replacement loads and warms up while the survivor serves
        finally:
            stop.set()
            watcher.join()
        assert statuses == [200] * 4
        assert len(seen) > 50 and set(seen) == {200}, sorted(set(seen))
        assert second in s.children()


@MODES
def test_killing_the_main_process_takes_every_child_with_it_and_frees_the_port(
    tiny_bundle: Path, tmp_path: Path, mode
) -> None:
    with running_server(tiny_bundle, *mode, tmp=tmp_path) as s:
        children = s._kids()
        assert len(children) >= 3  # API servers, and workers or not, and LitServe's Manager
        port = int(s.url.rsplit(":", 1)[1])
        s.proc.kill()  # kill -9: the main process runs none of its shutdown
        s.proc.wait()
        deadline = time.monotonic() + 2
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in children if alive(pid)] == [], s.output()[-2000:]
        assert bindable(port, within=2.0)  # a new server can take the port: "within a second or two"


def bindable(port: int, within: float) -> bool:
    """The port can be listened on (as `modelship serve` binds it, SO_REUSEADDR) within `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen()
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
        time.sleep(0.05)


def test_slow_clients_are_cut_off_with_408(tiny_bundle: Path, tmp_path: Path) -> None:
    with running_server(tiny_bundle, "--header-timeout", "1", "--body-timeout", "1", tmp=tmp_path) as s:
        port = int(s.url.rsplit(":", 1)[1])

        def trickle(head: bytes, body: bytes = b"") -> tuple[float, bytes]:
            """Send `head` whole, then `body` one byte every 0.2 s; (seconds until the server closed, its answer)."""
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                start = time.monotonic()
                sock.sendall(head)
                got = b""
                for byte in body:
                    try:
                        sock.sendall(bytes([byte]))
                    except OSError:
                        break
                    time.sleep(0.2)
                while chunk := sock.recv(4096):
                    got += chunk
                return time.monotonic() - start, got

        took, answer = trickle(b"", b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"the request did not send its headers within 1s"' in answer
        assert took < 4
        took, answer = trickle(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n", b"{" * 30)
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"the request did not send its body within 1s"' in answer
        assert took < 4
        took, answer = trickle(b"")  # a connection that sends nothing at all
        assert answer.startswith(b"HTTP/1.1 408 ") and took < 4
        assert predict(s.url).status_code == 200  # prompt clients are served as ever


def test_a_v2_json_body_larger_than_the_largest_batch_is_413_before_it_is_read(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    with running_server(tiny_bundle, tmp=tmp_path) as s:
        limit = 64 * 3 * 32 * 32 * 26 + 65536  # the manifest's max batch (64) of [3, 32, 32], every number at 26 bytes
        body = b" " * (limit + 1)
        r = httpx.post(s.url + "/v2/models/shapes-cnn/infer", content=body,
                       headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
        assert r.status_code == 413, r.text
        assert r.json()["error"] == (
            f"the request body ({limit + 1} bytes or more) is over the {limit} byte limit for a v2 JSON request to "
            "this model (its largest batch, 64 x 3x32x32 numbers); larger bodies are not a valid request"
        )
        x = np.full((64, 3, 32, 32), -1.2345678e-05, np.float32)  # the largest legitimate one still passes
        doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        assert httpx.post(s.url + "/v2/models/shapes-cnn/infer", json=doc, timeout=60).status_code == 200


def test_unknown_routes_and_methods_answer_the_api_error_shape_and_health_takes_head(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    with running_server(tiny_bundle, tmp=tmp_path) as s:
        r = httpx.get(s.url + "/nope")
        assert r.status_code == 404
        assert r.json() == {"error": "no route /nope; GET / lists the routes, /docs describes them"}
        r = httpx.post(s.url + "/health")
        assert r.status_code == 405 and r.json()["error"].startswith("POST is not allowed on /health; it takes ")
        for path in ("/health", "/v2/health/live", "/v2/health/ready", "/v2/models/shapes-cnn/ready"):
            r = httpx.head(s.url + path)
            assert (r.status_code, r.content) == (200, b""), path
        # the multipart /predict goes the same way as every other POST /predict: the guard's
        r = httpx.post(s.url + "/predict", files={"file": ("x.png", b"not a png", "image/png")})
        assert r.status_code == 400 and "uploaded file x.png" in r.json()["error"]
