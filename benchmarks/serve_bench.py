"""Served throughput against its ceilings, side by side in one run.

    python benchmarks/serve_bench.py --bundle DIR [--clients 64] [--seconds 10] [--rounds 3]
                                     [--serve-args "..."]... [--ceilings] [--plain] [--inprocess] [--cpu]
                                     [--soak 60]

Every contender runs alone while it is measured, with the same load generator (benchmarks/loadgen.py) and the same
payloads: one image as JSON `{"inputs": [...]}` (64 KB for 3x32x32) and as a KServe v2 binary request. Rounds
interleave the contenders and the median round is reported, so drift in a shared machine's speed hits all alike.

- `--payloads ...,grpc`: the same image as a KServe v2 gRPC ModelInfer (raw_input_contents), to modelship serve
  with `--grpc-port`; with `--ceilings`, also to a bare grpc.aio server of the same service that parses each request
  and answers a fixed output (benchmarks/bare_grpc.py), as many processes as modelship's API servers, driven by the
  same gRPC load generator (benchmarks/loadgen.py, one HTTP/2 connection per 8 clients); and the same server running
  each image through the bundle's ONNX model, batched on a thread with none of modelship's checks: the compute's share.
- `--ceilings`: a bare uvicorn ASGI app that reads (and, for JSON, parses with pydantic-core, as modelship does)
  each body and answers a fixed JSON, with as many processes as modelship's API servers: what no server can beat
  (benchmarks/bare_server.py); and the same app parsing JSON with the standard library's json.loads.
- `--plain`: a plain FastAPI endpoint with one eager PyTorch forward per request (benchmarks/plain_server.py).
- `--inprocess`: ONNX Runtime in this process on batches of --max-batch (samples/s): the compute ceiling.
- `--compare-checkout DIR`: modelship served from another checkout (a git worktree of an earlier commit), with this
  run's Python and dependencies, with each `--serve-args` just before this checkout's: before against after.
- `--cpu`: for each modelship server, the CPU time per answered request of its inference workers, its API servers,
  its main process (the request broker) and of this process (the load generator), from /proc over the measured
  window. On a saturated machine this is where the cores go; a sampling profiler would also count the time a
  runnable process waits for a core.
- `--soak S`: modelship under the v2 load for S seconds; the server's memory (RSS of all its processes) is sampled
  after warm-up and at the end, and every error is counted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loadgen import LoadResult, run_grpc_load, run_load

REPO = Path(__file__).resolve().parents[1]
PATH = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []  # kept: packages put there (--target)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *PATH])}
Payload = tuple[str, bytes, dict[str, str]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(port: int, grpc: bool) -> bool:
    if not grpc:
        with contextlib.suppress(OSError):
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
        return False
    import grpc as g

    from modelship.protos import inference_pb2 as pb

    with g.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ServerReady",
                                   response_deserializer=pb.ServerReadyResponse.FromString)  # fmt: skip
        with contextlib.suppress(g.RpcError):
            return bool(call(b"", timeout=2).ready)
    return False


def _wait_ready(proc: subprocess.Popen, log: IO[bytes], port: int, grpc: bool = False) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"server exited: {log.read().decode()[-3000:]}")
        if _ready(port, grpc):
            return
        time.sleep(0.1)
    raise SystemExit("server did not become ready")


@contextlib.contextmanager
def started(cmd: list[str], port: int, checkout: Path = REPO, grpc: bool = False) -> Iterator[subprocess.Popen]:
    """Run a server (from `checkout`: another one measures an earlier commit side by side) for the duration of the
    block; its output is shown only if it dies."""
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(checkout), *PATH])}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            cmd, cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            _wait_ready(proc, log, port, grpc)
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=40)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def payloads(manifest: dict) -> dict[str, Payload]:
    """(path, body, headers) per payload kind: one float32 image, in full JSON precision or as v2 binary."""
    c, h, w = manifest["input"]["shape"][1:]
    x = np.random.default_rng(0).standard_normal((c, h, w)).astype(np.float32)
    tensor = {"name": "input", "shape": [1, c, h, w], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
    header = json.dumps({"inputs": [tensor], "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]})
    binary_headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    from modelship.protos import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name=manifest["name"])
    request.inputs.add(name="input", datatype="FP32", shape=[1, c, h, w])
    request.outputs.add(name="logits")
    request.raw_input_contents.append(x.tobytes())
    return {
        "json": ("/predict", json.dumps({"inputs": x.tolist()}).encode(), {"Content-Type": "application/json"}),
        "v2-binary": (f"/v2/models/{manifest['name']}/infer", header.encode() + x.tobytes(), binary_headers),
        "grpc": ("/inference.GRPCInferenceService/ModelInfer", request.SerializeToString(), {}),
    }


def measure(name: str, kind: str, port: int, payload: Payload, args: argparse.Namespace,
            server: int | None = None) -> dict:  # fmt: skip
    """One contender under load; with --cpu and the `server`'s pid, the CPU per request of each of its roles."""
    path, body, headers = payload
    marks: list[dict[str, float]] = []  # at the start and the end of the measured window
    timers = [threading.Timer(at, lambda pid=server: marks.append(cpu_by_role(pid)))
              for at in (WARMUP, WARMUP + args.seconds) if args.cpu and server is not None]  # fmt: skip
    for timer in timers:
        timer.start()
    r: LoadResult = (
        run_grpc_load(f"127.0.0.1:{port}", path, body, args.clients, args.seconds, WARMUP)
        if kind == "grpc"
        else run_load(f"http://127.0.0.1:{port}{path}", body, headers, args.clients, args.seconds, WARMUP)
    )
    for timer in timers:
        timer.join()
    row = {"server": name, "payload": kind, "req_per_s": round(r.throughput, 1),
           "p50_ms": round(r.percentile(50) * 1000, 2), "p99_ms": round(r.percentile(99) * 1000, 2),
           "errors": r.errors, "requests": r.requests}  # fmt: skip
    if len(marks) == 2 and r.requests:
        row["cpu_us"] = {k: round((marks[1][k] - marks[0][k]) / r.requests * 1e6, 1) for k in ROLES}
    return row


WARMUP = 2.0
ROLES = ("inference workers", "API servers", "main (broker)", "load generator")


def descendants(pid: int) -> list[int]:
    """A process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_by_role(server: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of a modelship server's processes by role, and of this process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = dict.fromkeys(ROLES, 0.0)
    for pid in [*descendants(server), os.getpid()]:
        with contextlib.suppress(OSError, IndexError):
            fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
            role = ("load generator" if pid == os.getpid() else "main (broker)" if pid == server
                    else "inference workers" if b"multiprocessing.spawn" in cmdline else "API servers")  # fmt: skip
            out[role] += (int(fields[11]) + int(fields[12])) / tick
    return out


def serve_cmd(bundle: Path, port: int, extra: str) -> list[str]:
    serve = ["-m", "modelship.cli", "serve", str(bundle), "--port", str(port), "--log-level", "warning"]
    return [sys.executable, *serve, *shlex.split(extra)]


def inprocess(bundle: Path, manifest: dict, batch: int, seconds: float) -> dict:
    """ONNX Runtime in this process, every core, on batches of `batch`: samples per second."""
    from modelship.backends import onnx_backend

    backend = onnx_backend(bundle / manifest["artifacts"]["onnx"]["path"], "cpu", os.cpu_count() or 1)
    x = np.random.default_rng(0).standard_normal((batch, *manifest["input"]["shape"][1:])).astype(np.float32)
    for _ in range(3):
        backend(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        backend(x)
        n += batch
    rate = n / (time.perf_counter() - t0)
    return {"server": f"in-process ONNX Runtime, batch {batch}", "payload": "-", "req_per_s": round(rate, 1),
            "p50_ms": float("nan"), "p99_ms": float("nan"), "errors": 0, "requests": n}  # fmt: skip


def round_of(bundle: Path, manifest: dict, loads: dict[str, Payload], args: argparse.Namespace) -> list[dict]:
    """One measurement of every contender, in turn."""
    out = []
    if args.ceilings:
        for parser, kinds in (("pydantic", loads), ("json", {k: v for k, v in loads.items() if k == "json"})):
            if not kinds:
                continue
            port = free_port()
            cmd = [sys.executable, "benchmarks/bare_server.py", "--port", str(port), "--workers",
                   str(args.bare_workers), "--parser", parser]  # fmt: skip
            name = "bare ASGI ceiling" if parser == "pydantic" else "bare ASGI, json.loads"
            with started(cmd, port):
                out += [measure(name, kind, port, p, args) for kind, p in kinds.items() if kind != "grpc"]
        if "grpc" in loads:
            for name, model in (("bare gRPC ceiling", []), ("bare gRPC with the model", ["--bundle", str(bundle)])):
                port = free_port()
                cmd = [sys.executable, "benchmarks/bare_grpc.py", "--port", str(port), "--workers",
                       str(args.bare_workers), "--classes", str(len(manifest["classes"])), *model]  # fmt: skip
                with started(cmd, port, grpc=True):
                    out.append(measure(name, "grpc", port, loads["grpc"], args))
    if args.plain:
        port = free_port()
        checkpoint = args.checkpoint or Path(manifest["source"]["checkpoint"])
        with started([sys.executable, "benchmarks/plain_server.py", str(checkpoint), "--port", str(port)], port):
            out.append(measure("plain FastAPI + eager", "json", port, payloads(manifest)["json"], args))
    if args.inprocess:
        out.append(inprocess(bundle, manifest, args.max_batch, args.seconds))
    for extra in args.serve_args or [""]:
        flags = f" {extra}" if extra else ""
        if args.compare_checkout:
            other = f"modelship serve{flags} (the other checkout)"
            out += served(other, bundle, extra, loads, args, args.compare_checkout)
        out += served(f"modelship serve{flags}", bundle, extra, loads, args)
    return out


def served(name: str, bundle: Path, extra: str, loads: dict[str, Payload], args: argparse.Namespace,
           checkout: Path = REPO) -> list[dict]:  # fmt: skip
    """modelship serve (of `checkout`) under each payload; with gRPC on a second port when a payload is gRPC."""
    port, grpc_port = free_port(), free_port()
    grpc = f" --grpc-port {grpc_port}" if "grpc" in loads else ""
    with started(serve_cmd(bundle, port, extra + grpc), port, checkout) as proc:
        return [measure(name, kind, grpc_port if kind == "grpc" else port, p, args, proc.pid)
                for kind, p in loads.items()]  # fmt: skip


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes (Linux /proc)."""
    total = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError, IndexError):
            total += int((Path("/proc") / str(p) / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total


def soak(bundle: Path, manifest: dict, args: argparse.Namespace) -> dict:
    """modelship under the v2 load for args.soak seconds: memory after warm-up and at the end, and errors."""
    port = free_port()
    path, body, headers = payloads(manifest)["v2-binary"]
    samples: list[tuple[float, int]] = []
    with started(serve_cmd(bundle, port, (args.serve_args or [""])[0]), port) as proc:
        done = threading.Event()

        def sample() -> None:
            t0 = time.monotonic()
            while not done.wait(5.0):
                samples.append((time.monotonic() - t0, tree_rss(proc.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        r = run_load(f"http://127.0.0.1:{port}{path}", body, headers, args.clients, args.soak, warmup=10.0)
        done.set()
        end = tree_rss(proc.pid)
    start = next(rss for t, rss in samples if t >= 10.0)  # after the warm-up
    return {"seconds": args.soak, "requests": r.requests, "errors": r.errors, "req_per_s": round(r.throughput, 1),
            "rss_start_mb": round(start / 2**20, 1), "rss_end_mb": round(end / 2**20, 1),
            "rss_growth": round(end / start - 1, 4)}  # fmt: skip


def median_run(rounds: list[dict]) -> dict:
    """The round with the median throughput, with every round's throughput alongside."""
    ordered = sorted(rounds, key=lambda r: r["req_per_s"])
    return {**ordered[len(ordered) // 2], "rounds": [r["req_per_s"] for r in rounds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, help="for --plain (default: the bundle's source)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement, after 2s of warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--serve-args", action="append", help="`modelship serve` flags; repeat to compare settings")
    parser.add_argument("--payloads", default="json,v2-binary",
                        help="which of json, v2-binary, grpc to send (default json,v2-binary)")  # fmt: skip
    parser.add_argument("--ceilings", action="store_true", help="the bare ASGI app on the same payloads")
    parser.add_argument("--bare-workers", type=int, default=2, help="processes of the bare app (default 2)")
    parser.add_argument("--plain", action="store_true", help="the plain FastAPI + eager endpoint (JSON)")
    parser.add_argument("--inprocess", action="store_true", help="in-process ONNX Runtime on batches")
    parser.add_argument("--max-batch", type=int, default=32, help="batch for --inprocess (default 32)")
    parser.add_argument("--cpu", action="store_true", help="CPU per request of each modelship process role")
    parser.add_argument(
        "--compare-checkout",
        type=Path,
        metavar="DIR",
        help="also serve with the modelship of this checkout (e.g. a git worktree of an earlier commit)",
    )
    parser.add_argument("--soak", type=float, default=0.0, help="seconds of soak under load (default: none)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    manifest = json.loads((args.bundle / "manifest.json").read_text())
    loads = {k: v for k, v in payloads(manifest).items() if k in args.payloads.split(",")}
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for row in round_of(args.bundle, manifest, loads, args):
            runs.setdefault((row["server"], row["payload"]), []).append(row)
    rows = [median_run(v) for v in runs.values()]
    soaked = soak(args.bundle, manifest, args) if args.soak else None
    report(rows, soaked, manifest, args)


def report(rows: list[dict], soaked: dict | None, manifest: dict, args: argparse.Namespace) -> None:
    def find(prefix: str, payload: str | None = None) -> float | None:
        hits = [r["req_per_s"] for r in rows if r["server"].startswith(prefix) and payload in (None, r["payload"])]
        return hits[0] if hits else None

    def ratio(r: dict, of: float | None, suffix: str = "") -> str:
        return f"{r['req_per_s'] / of:.3f}{suffix}" if of and r["server"].startswith("modelship") else "-"

    compute, plain, loads = find("in-process"), find("plain"), find("bare ASGI, json.loads", "json")
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    print(f"{args.clients} concurrent clients, {args.seconds:g}s per measurement, median of {args.rounds} interleaved "
          f"rounds; model {manifest['model']['arch']} {manifest['input']['shape']}\n")  # fmt: skip
    width = max((len(r["server"]) for r in rows), default=6)
    print(f"{'server'.ljust(width)}  payload      req/s   p50 ms   p99 ms  errors  of bare  of json.loads  of in-proc"
          "  vs plain  (req/s per round)")  # fmt: skip
    for r in rows:
        bare = find("bare gRPC ceiling" if r["payload"] == "grpc" else "bare ASGI ceiling", r["payload"])
        json_loads = ratio(r, loads) if r["payload"] == "json" else "-"
        vs_plain = ratio(r, plain, "x") if r["payload"] == "json" else "-"
        p50, p99 = (f"{r[k]:.2f}" if r[k] == r[k] else "-" for k in ("p50_ms", "p99_ms"))
        each = ", ".join(f"{v:.0f}" for v in r["rounds"])
        print(f"{r['server'].ljust(width)}  {r['payload']:<10} {r['req_per_s']:>7.1f}  {p50:>7}  {p99:>7}  "
              f"{r['errors']:>6}  {ratio(r, bare):>7}  {json_loads:>13}  {ratio(r, compute):>10}  {vs_plain:>8}"
              f"  ({each})")  # fmt: skip
    bare_grpc, with_model = find("bare gRPC ceiling", "grpc"), find("bare gRPC with the model", "grpc")
    if bare_grpc and with_model:
        print(f"\nbare gRPC with the model: {with_model / bare_grpc:.3f} of the bare gRPC ceiling (the most a server "
              "that runs this model reaches here)")  # fmt: skip
    with_cpu = [r for r in rows if "cpu_us" in r]
    if with_cpu:
        print(f"\nCPU per answered request, microseconds (the median round's): {', '.join(ROLES)}")
        for r in with_cpu:
            each = "  ".join(f"{r['cpu_us'][k]:>8.1f}" for k in ROLES)
            print(f"{r['server'].ljust(width)}  {r['payload']:<10} {each}")
    if soaked:
        print(f"\nsoak {soaked['seconds']:g}s: {soaked['requests']} requests ({soaked['req_per_s']:.0f}/s), "
              f"{soaked['errors']} errors, RSS {soaked['rss_start_mb']:.0f} -> {soaked['rss_end_mb']:.0f} MB "
              f"({soaked['rss_growth']:+.1%})")  # fmt: skip
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": rows, "soak": soaked, "clients": args.clients}, indent=2) + "\n")


if __name__ == "__main__":
    main()
