"""Faults under load: requests sent, answered, 5xx and lost while each kind of server process is killed or stopped.

    python benchmarks/fault_bench.py --bundle DIR [--clients 32] [--seconds 25] [--hang-timeout S]
                                     [--scenario NAME]... [--checkout DIR] [--json FILE]

Each scenario starts a fresh server, drives it with `--clients` keep-alive connections sending v2 binary requests
one after another, applies its fault, keeps the load on for `--seconds`, and counts every request by what became of
it:
- answered: 200;
- 5xx: an answer of 500-503 (a 503 is the promised answer for a request two workers died on);
- lost: no answer within the server's --timeout (its 504), or none at all within the client's timeout;
- reset: the connection died under the request (its API server was killed: the request died with the process
  that had accepted it, and the client reconnects).
The worst latency is printed too: under a SIGSTOP it is bounded by the hang timeout (the stopped worker is killed
and what it held is run again elsewhere). The faults touch only processes of the server this script started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from benchmarks.loadgen import _read_response, build_request
from benchmarks.serve_bench import REPO, descendants, free_port, payloads, serve_cmd, started

CLIENT_TIMEOUT = 60.0


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    errors_5xx: int = 0
    lost: int = 0
    reset: int = 0
    other: int = 0
    worst: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)


async def drive(url: str, body: bytes, headers: dict[str, str], clients: int, stop: threading.Event) -> Tally:
    host, port, request = build_request(url, body, headers)
    tally = Tally()

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        while not stop.is_set():
            t0 = time.perf_counter()
            tally.sent += 1
            writer.write(request)
            try:
                status, _ = await asyncio.wait_for(_read_response(reader), CLIENT_TIMEOUT)
            except asyncio.TimeoutError:
                tally.lost += 1
                status = None
            except (asyncio.IncompleteReadError, ConnectionError):
                tally.reset += 1
                status = None
            if status is None:  # a fresh connection: the old one is dead or its answer is owed
                writer.close()
                for _ in range(100):
                    try:
                        reader, writer = await asyncio.open_connection(host, port)
                        break
                    except OSError:
                        await asyncio.sleep(0.05)
                continue
            tally.worst = max(tally.worst, time.perf_counter() - t0)
            tally.statuses[status] = tally.statuses.get(status, 0) + 1
            if status == 200:
                tally.answered += 1
            elif status == 504:
                tally.lost += 1
            elif status >= 500:
                tally.errors_5xx += 1
            else:
                tally.other += 1
        writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return tally


def roles(server: int) -> dict[str, list[int]]:
    """The server's processes by kind: inference workers (spawned) and API servers (forked, listening)."""
    out: dict[str, list[int]] = {"workers": [], "api": []}
    for pid in descendants(server)[1:]:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
        if ppid != server:
            continue
        if b"multiprocessing.spawn" in cmd:
            out["workers"].append(pid)
        elif b"modelship.cli" in cmd and listens(pid):
            out["api"].append(pid)
    return out


def listens(pid: int) -> bool:
    try:
        links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return False
    return any(link.startswith("socket:") for link in links) and not Path(f"/proc/{pid}/cmdline").read_bytes().count(
        b"resource_tracker"
    )


def kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def every_few_seconds(kind: str, period: float) -> Callable[[int, threading.Event], None]:
    def fault(server: int, stop: threading.Event) -> None:
        while not stop.wait(period):
            pids = roles(server)[kind]
            if pids:
                kill(pids[0])

    return fault


def both_workers(server: int, stop: threading.Event) -> None:
    while not stop.wait(6.0):
        for pid in roles(server)["workers"]:
            kill(pid)


def sigstop_worker(seconds: float) -> Callable[[int, threading.Event], None]:
    def fault(server: int, stop: threading.Event) -> None:
        if stop.wait(2.0):
            return
        pid = roles(server)["workers"][0]
        kill(pid, signal.SIGSTOP)
        stop.wait(seconds)
        kill(pid, signal.SIGCONT)  # if the server has not killed it already

    return fault


SCENARIOS: dict[str, tuple[str, Callable[[argparse.Namespace], Callable[[int, threading.Event], None]]]] = {
    "kill a worker every 3 s": ("", lambda a: every_few_seconds("workers", 3.0)),
    "kill both workers every 6 s": ("", lambda a: both_workers),
    "SIGSTOP a worker for 20 s": ("", lambda a: sigstop_worker(20.0)),
    "kill an API server every 4 s": ("", lambda a: every_few_seconds("api", 4.0)),
    "in-process: kill an API server every 4 s": ("--in-process", lambda a: every_few_seconds("api", 4.0)),
}


def scenario(name: str, args: argparse.Namespace, loads: dict) -> Tally:
    extra, make = SCENARIOS[name]
    port = free_port()
    if args.hang_timeout is not None:
        extra = f"{extra} --hang-timeout {args.hang_timeout}"
    with started(serve_cmd(args.bundle, port, extra), port, args.checkout) as proc:
        path, body, headers = loads["v2-binary"]
        stop = threading.Event()
        fault = threading.Thread(target=make(args), args=(proc.pid, stop))
        timer = threading.Timer(args.seconds, stop.set)
        fault.start()
        timer.start()
        tally = asyncio.run(drive(f"http://127.0.0.1:{port}{path}", body, headers, args.clients, stop))
        fault.join()
    return tally


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan that exited waits for init to reap it, which in a container may be never)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main_process_kill(args: argparse.Namespace) -> float:
    """Seconds from kill -9 of the main process until every child is gone and the port can be bound again."""
    port = free_port()
    with started(serve_cmd(args.bundle, port, ""), port, args.checkout) as proc:
        children = descendants(proc.pid)[1:]
        t0 = time.monotonic()
        proc.kill()
        proc.wait()
        while time.monotonic() - t0 < 30:
            if not any(running(pid) for pid in children):
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a new server binds it
                    try:
                        s.bind(("127.0.0.1", port))
                        return time.monotonic() - t0
                    except OSError:
                        pass
            time.sleep(0.02)
    return float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--hang-timeout", type=float, help="the server's (default: its own default)")
    parser.add_argument(
        "--checkout",
        type=Path,
        default=REPO,
        help="serve from this checkout (a git worktree of an earlier commit): before and after",
    )
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="default: every one")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    loads = payloads(manifest)
    print(f"{platform.machine()}, {os.cpu_count()} cores; {args.clients} clients, {args.seconds:g} s a scenario; "
          f"serving from {args.checkout}, --hang-timeout {args.hang_timeout or 'default'}")  # fmt: skip
    print(f"{'scenario':<44} {'sent':>7} {'answered':>9} {'5xx':>5} {'lost':>5} {'reset':>6} {'worst s':>8}")
    rows = []
    for name in args.scenario or list(SCENARIOS):
        t = scenario(name, args, loads)
        rows.append({"scenario": name, **t.__dict__})
        print(f"{name:<44} {t.sent:>7} {t.answered:>9} {t.errors_5xx:>5} {t.lost:>5} {t.reset:>6} {t.worst:>8.2f}")
    took = main_process_kill(args)
    rows.append({"scenario": "kill -9 the main process", "seconds_until_port_free": took})
    print(f"kill -9 the main process: every child gone and the port free after {took:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
