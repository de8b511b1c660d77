"""Served throughput: `modelship serve` against a plain FastAPI + eager PyTorch endpoint, side by side in one run.

    python benchmarks/serve_bench.py [--bundle DIR] [--clients 64] [--seconds 10] [--repeat 3]

Without --bundle it trains and exports the default shapes cnn first. Each server runs alone while it is measured;
the same load generator (benchmarks/loadgen.py) drives both with the same JSON tensor payload, then modelship again
with the binary v2 payload. Rounds interleave the servers and the median round is reported, so drift in a shared
(virtual) machine's speed hits every server alike. `--serve-args` (repeatable) and `--sweep` compare settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loadgen import LoadResult, run_load

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
PLAIN = "plain FastAPI + eager"
SWEEP = [
    "--max-batch-size 1",
    "--workers-per-device 1",
    "--batch-timeout 0",
    "--batch-timeout 0.01",
    "--max-batch-size 8",
    "--backend torchscript",
]
Payload = tuple[str, bytes, dict[str, str]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(proc: subprocess.Popen, log: IO[bytes], port: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"server exited: {log.read().decode()[-3000:]}")
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return
        time.sleep(0.1)
    raise SystemExit("server did not become ready")


@contextlib.contextmanager
def started(cmd: list[str], port: int) -> Iterator[None]:
    """Run a server for the duration of the block; its output is shown only if it dies."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_ready(proc, log, port)
            yield
        finally:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=40)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def default_bundle(workdir: Path) -> Path:
    cli = [sys.executable, "-m", "modelship.cli"]
    run = workdir / "run"
    subprocess.run(
        [*cli, "train", "--epochs", "1", "--out", str(run), "--device", "cpu"], check=True, env=ENV, cwd=REPO
    )
    bundle = workdir / "shapes-cnn"
    export = [*cli, "export", str(run / "checkpoints" / "best.pt"), "--out", str(bundle)]
    subprocess.run(export, check=True, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL)
    return bundle


def payloads(manifest: dict) -> dict[str, Payload]:
    """(path, body, headers) per payload kind: one float32 image, in full JSON precision or as v2 binary."""
    c, h, w = manifest["input"]["shape"][1:]
    x = np.random.default_rng(0).standard_normal((c, h, w)).astype(np.float32)
    tensor = {"name": "input", "shape": [1, c, h, w], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
    header = json.dumps({"inputs": [tensor], "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]})
    binary_headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    return {
        "json": ("/predict", json.dumps({"inputs": x.tolist()}).encode(), {"Content-Type": "application/json"}),
        "v2-binary": (f"/v2/models/{manifest['name']}/infer", header.encode() + x.tobytes(), binary_headers),
    }


def measure(name: str, kind: str, port: int, payload: Payload, args: argparse.Namespace) -> dict:
    path, body, headers = payload
    r: LoadResult = run_load(f"http://127.0.0.1:{port}{path}", body, headers, args.clients, args.seconds)
    return {
        "server": name,
        "payload": kind,
        "req_per_s": round(r.throughput, 1),
        "p50_ms": round(r.percentile(50) * 1000, 2),
        "p99_ms": round(r.percentile(99) * 1000, 2),
        "errors": r.errors,
        "requests": r.requests,
    }


def median_run(rounds: list[dict]) -> dict:
    """The round with the median throughput, with every round's throughput alongside."""
    ordered = sorted(rounds, key=lambda r: r["req_per_s"])
    return {**ordered[len(ordered) // 2], "rounds": [r["req_per_s"] for r in rounds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="default: train and export the shapes cnn")
    parser.add_argument("--checkpoint", type=Path, help="for the plain endpoint (default: the bundle's source)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement, after 2s of warm-up")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--serve-args", action="append", help="`modelship serve` flags; repeat to compare settings")
    parser.add_argument("--sweep", action="store_true", help="also measure the settings the defaults were chosen from")
    parser.add_argument("--payloads", default="json,v2-binary", help="which payloads to send modelship (default both)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain FastAPI + eager endpoint")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or default_bundle(Path(tmp))
        manifest = json.loads((bundle / "manifest.json").read_text())
        checkpoint = args.checkpoint or Path(manifest["source"]["checkpoint"])
        loads = {k: v for k, v in payloads(manifest).items() if k in args.payloads.split(",")}
        configs = (args.serve_args or [""]) + (SWEEP if args.sweep else [])
        for _ in range(args.repeat):
            if not args.no_plain:
                port = free_port()
                plain = [sys.executable, "benchmarks/plain_server.py", str(checkpoint), "--port", str(port)]
                with started(plain, port):
                    json_load = payloads(manifest)["json"]
                    runs.setdefault((PLAIN, "json"), []).append(measure(PLAIN, "json", port, json_load, args))
            for extra in configs:
                name = "modelship serve" + (f" {extra}" if extra else "")
                port = free_port()
                serve = ["-m", "modelship.cli", "serve", str(bundle), "--port", str(port), "--log-level", "warning"]
                with started([sys.executable, *serve, *extra.split()], port):
                    for kind, payload in loads.items():
                        runs.setdefault((name, kind), []).append(measure(name, kind, port, payload, args))

    rows = [median_run(v) for v in runs.values()]
    base = rows[0]["req_per_s"]
    first = {}  # the first modelship configuration's throughput per payload
    for r in rows:
        if r["server"] != PLAIN:
            first.setdefault(r["payload"], r["req_per_s"])
    width = max(len(r["server"]) for r in rows)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    print(
        f"{args.clients} concurrent clients, {args.seconds:g}s per measurement, median of {args.repeat} interleaved "
        f"rounds; model {manifest['model']['arch']} {manifest['input']['shape']}\n"
    )
    vs = "vs plain" if rows[0]["server"] == PLAIN else "vs first"
    print(f"{'server'.ljust(width)}  payload      req/s   p50 ms   p99 ms  errors  {vs}  vs 1st cfg  (req/s per round)")
    for r in rows:
        each = ", ".join(f"{v:.0f}" for v in r["rounds"])
        own = r["req_per_s"] / first[r["payload"]] if r["payload"] in first and r["server"] != PLAIN else float("nan")
        print(
            f"{r['server'].ljust(width)}  {r['payload']:<10} {r['req_per_s']:>7.1f}  {r['p50_ms']:>7.2f}  "
            f"{r['p99_ms']:>7.2f}  {r['errors']:>6}  {r['req_per_s'] / base:>7.2f}x  {own:>9.2f}x  ({each})"
        )
    if args.json_out:
        doc = {"clients": args.clients, "seconds": args.seconds, "repeat": args.repeat, "rows": rows}
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
