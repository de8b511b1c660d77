"""The model repository under load: a live version swap, two models against one, memory given back on unload, and
rollouts (shadow and canary: failed requests, the canary's share, the time to promotion, shadow's cost).

    python benchmarks/repository_bench.py --bundle DIR [--clients 32] [--seconds 10] [--rounds 3] [--poll 1.0]
        [--rollout-seconds 20] [--only all|rollouts]

Every part drives modelship serve with the same closed-loop generator as serve_bench (benchmarks/loadgen.py),
KServe v2 binary requests of one image.

- swap: a repository with version 1 of a model, served with `--model-control poll --poll-interval P`, under
  --clients; after a third of the run, version 2 is published (modelship.repository.publish: one rename). Counted:
  every request that did not get a 200 (goal 0); the time from the rename to the first answer from version 2 (goal
  under 2 x P plus the version's load time, measured as an explicit load of the same bundle); the last answer from
  version 1; throughput in the seconds before the swap, while it happens, and after.
- two models: the same server holding one model, against holding two (the load split between them), alternated
  over --rounds: the ratio of req/s.
- memory: `--model-control explicit` with one model loaded; the resident memory of every server process after
  loading a second model, and after unloading it again.
- rollouts: the swap's setting under `--rollout shadow` and `--rollout canary` (defaults: 1000 compared requests,
  canary 10%) for --rollout-seconds; version 2 is a copy of the bundle (the same answers: it must be promoted).
  Counted: failed requests (goal 0), the canary's share of the answers while it ran against its percent, the time
  from the rename to the promotion.
- shadow's cost: the serving version's req/s with a shadow rollout running (it never ends: 10^7 requests) at
  --shadow-sample 0.1 and 1.0, against the same server with no rollout, alternated over --rounds (goal at 0.1:
  at least 0.9); and the copies an overloaded server dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loadgen import run_load
from benchmarks.serve_bench import free_port, payloads, serve_cmd, started, tree_rss
from modelship.repository import publish

VERSION = re.compile(rb'"model_version":\s*"(\d+)"')


def repo_with(root: Path, bundle: Path, models: dict[str, int]) -> Path:
    """root/<name>/<1..n>/, each a copy of `bundle` (the folder names the model on the API, as in Triton)."""
    for name, versions in models.items():
        for v in range(1, versions + 1):
            shutil.copytree(bundle, root / name / str(v))
    return root


def swap(bundle: Path, args: argparse.Namespace, work: Path) -> dict:
    repo = repo_with(work / "swap", bundle, {"m": 1})
    port = free_port()
    path, body, headers = payloads(json.loads((bundle / "manifest.json").read_text()))["v2-binary"]
    path = "/v2/models/m/infer"
    answers: list[tuple[float, int, bytes]] = []
    published: list[float] = []
    staged = work / "next"
    shutil.copytree(bundle, staged)
    manifest = json.loads((staged / "manifest.json").read_text())
    (staged / "manifest.json").write_text(json.dumps({**manifest, "name": "m"}))  # publish() files it under m
    with started(serve_cmd(repo, port, f"--model-control poll --poll-interval {args.poll}"), port):
        timer = threading.Timer(args.seconds / 3, lambda: (published.append(time.perf_counter()),
                                                          publish(staged, repo)))  # fmt: skip
        timer.start()
        run_load(f"http://127.0.0.1:{port}{path}", body, headers, args.clients, args.seconds, 0.0,
                 record=lambda t, status, b: answers.append((t, status, b)))  # fmt: skip
        timer.join()
    t_pub = published[0]
    versions = [(t, s, (m.group(1).decode() if (m := VERSION.search(b[:400])) else "")) for t, s, b in answers]
    first_v2 = min(t for t, s, v in versions if v == "2")
    last_v1 = max(t for t, s, v in versions if v == "1")
    failed = sum(1 for _, s, _ in versions if s != 200)

    def rate(lo: float, hi: float) -> float:
        return sum(1 for t, _, _ in versions if lo <= t < hi) / (hi - lo)

    start, end = versions[0][0], versions[-1][0]
    return {"requests": len(versions), "failed": failed, "appear_to_serve_s": round(first_v2 - t_pub, 3),
            "last_v1_after_s": round(last_v1 - t_pub, 3), "poll_interval_s": args.poll,
            "req_per_s_before": round(rate(start + 1, t_pub), 1),
            "req_per_s_during": round(rate(t_pub, last_v1 + 0.5), 1),
            "req_per_s_after": round(rate(last_v1 + 0.5, end), 1)}  # fmt: skip


def staged(bundle: Path, folder: Path) -> Path:
    """A copy of the bundle named m (publish() files it under its name), to be published as the next version."""
    shutil.copytree(bundle, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "name": "m"}))
    return folder


def get(port: int, path: str) -> dict:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30).read())


def rollout(bundle: Path, args: argparse.Namespace, work: Path, mode: str) -> dict:
    repo = repo_with(work / f"rollout-{mode}", bundle, {"m": 1})
    nxt = staged(bundle, work / f"next-{mode}")
    port = free_port()
    _, body, headers = payloads(json.loads((bundle / "manifest.json").read_text()))["v2-binary"]
    answers: list[tuple[float, int, bytes]] = []
    published: list[float] = []
    wall = time.time() - time.perf_counter()  # perf_counter to wall-clock time, for the rollout's own times
    flags = f"--model-control poll --poll-interval {args.poll} --rollout {mode}"
    with started(serve_cmd(repo, port, flags), port):
        timer = threading.Timer(args.rollout_seconds / 4, lambda: (published.append(time.perf_counter() + wall),
                                                                  publish(nxt, repo)))  # fmt: skip
        timer.start()
        run_load(f"http://127.0.0.1:{port}/v2/models/m/infer", body, headers, args.clients, args.rollout_seconds,
                 0.0, record=lambda t, status, b: answers.append((t + wall, status, b)))  # fmt: skip
        timer.join()
        doc = get(port, "/v2/models/m/rollout")
    versions = [(t, s, (m.group(1).decode() if (m := VERSION.search(b[:400])) else "")) for t, s, b in answers]
    ended = doc["ended"] or float("inf")
    during = [v for t, _, v in versions if doc["started"] + 0.2 <= t <= ended - 0.2]  # routing follows in 0.1 s
    return {"state": doc["state"], "requests": len(versions), "failed": sum(1 for _, s, _ in versions if s != 200),
            "publish_to_end_s": round(ended - published[0], 2), "rollout_s": round(doc["seconds"], 2),
            "compared": doc["requests"]["compared"], "dropped": doc["requests"]["dropped"],
            "candidate_share_answered": round(during.count("2") / max(1, len(during)), 4) if mode == "canary" else 0.0,
            "reason": doc["reason"]}  # fmt: skip


def shadow_cost(bundle: Path, args: argparse.Namespace, work: Path) -> dict:
    _, body, headers = payloads(json.loads((bundle / "manifest.json").read_text()))["v2-binary"]
    contenders = {"no rollout": "", "shadow 0.1": "0.1", "shadow 1.0": "1.0"}
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    dropped: dict[str, list[int]] = {name: [] for name in contenders}
    for r in range(args.rounds):
        for name, sample in contenders.items():
            repo = repo_with(work / f"cost-{r}-{name.replace(' ', '')}", bundle, {"m": 1})
            port = free_port()
            flags = f"--model-control poll --poll-interval {args.poll}"
            if sample:
                flags += f" --rollout shadow --shadow-sample {sample} --rollout-requests 10000000"
            with started(serve_cmd(repo, port, flags), port):
                if sample:
                    publish(staged(bundle, work / f"next-{r}-{sample}"), repo)
                    deadline = time.monotonic() + 60
                    while get(port, "/v2/models/m/rollout").get("state") != "running" and time.monotonic() < deadline:
                        time.sleep(0.1)
                result = run_load(f"http://127.0.0.1:{port}/v2/models/m/infer", body, headers, args.clients,
                                  args.seconds, 2.0)  # fmt: skip
                if sample:
                    dropped[name].append(get(port, "/v2/models/m/rollout")["requests"]["dropped"])
            if result.errors:
                raise SystemExit(f"{name}: {result.errors} errors")
            rates[name].append(round(result.throughput, 1))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"req_per_s": med, "rounds": rates, "dropped": dropped,
            "ratio": {k: round(v / med["no rollout"], 3) for k, v in med.items()}}  # fmt: skip


def two_models(bundle: Path, args: argparse.Namespace, work: Path) -> dict:
    one = repo_with(work / "one", bundle, {"a": 1})
    two = repo_with(work / "two", bundle, {"a": 1, "b": 1})
    _, body, headers = payloads(json.loads((bundle / "manifest.json").read_text()))["v2-binary"]
    rates: dict[str, list[float]] = {"one model": [], "two models": []}
    for _ in range(args.rounds):
        for name, repo, models in (("one model", one, ["a"]), ("two models", two, ["a", "b"])):
            port = free_port()
            with started(serve_cmd(repo, port, ""), port):
                results = split_load(port, models, body, headers, args)
            if any(r.errors for r in results):
                raise SystemExit(f"{name}: {sum(r.errors for r in results)} errors")
            rates[name].append(sum(r.throughput for r in results))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"req_per_s": {k: round(v, 1) for k, v in med.items()}, "rounds": rates,
            "two_over_one": round(med["two models"] / med["one model"], 3)}  # fmt: skip


def split_load(port: int, models: list[str], body: bytes, headers: dict[str, str], args: argparse.Namespace) -> list:
    """The clients split evenly over `models`, all driven at once (a thread each)."""
    results = []

    def drive(model: str) -> None:
        url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
        results.append(run_load(url, body, headers, args.clients // len(models), args.seconds, 2.0))

    threads = [threading.Thread(target=drive, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def memory(bundle: Path, args: argparse.Namespace, work: Path) -> dict:
    repo = repo_with(work / "mem", bundle, {"a": 1, "b": 1})
    port = free_port()

    def post(path: str) -> float:
        t0 = time.perf_counter()
        urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{port}{path}", b"", method="POST"), timeout=300
        )
        return time.perf_counter() - t0

    with started(serve_cmd(repo, port, "--model-control explicit --load-model a"), port) as proc:
        time.sleep(2)
        base = tree_rss(proc.pid)
        load_s = post("/v2/repository/models/b/load")
        time.sleep(2)
        loaded = tree_rss(proc.pid)
        index = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/repository/index", b"", method="POST")).read())  # fmt: skip
        post("/v2/repository/models/b/unload")
        time.sleep(2)
        unloaded = tree_rss(proc.pid)
    reported = next(r["resident_bytes"] for r in index if r["name"] == "b")
    mib = 2**20
    return {"load_s": round(load_s, 2), "rss_one_mib": round(base / mib, 1), "rss_two_mib": round(loaded / mib, 1),
            "rss_after_unload_mib": round(unloaded / mib, 1),
            "index_resident_mib": round(reported / mib, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--poll", type=float, default=1.0)
    parser.add_argument("--rollout-seconds", type=float, default=20.0, help="each rollout run's length")
    parser.add_argument("--only", choices=("all", "rollouts"), default="all", help="rollouts: only the rollouts' parts")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; bundle {args.bundle.name}, "
          f"{args.clients} clients, v2 binary")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        figures = rollouts(args, work)
        if args.only == "all":
            figures |= repository(args, work)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


def rollouts(args: argparse.Namespace, work: Path) -> dict:
    figures = {}
    for mode in ("shadow", "canary"):
        figures[f"rollout {mode}"] = r = rollout(args.bundle, args, work, mode)
        print(f"rollout {mode}:", json.dumps(r))
        share = f"; the canary answered {r['candidate_share_answered']:.3f} of them (10%)" if mode == "canary" else ""
        print(f"  failed {r['failed']} of {r['requests']} (goal 0); {r['state']} {r['publish_to_end_s']} s after the "
              f"rename ({r['rollout_s']} s of rollout){share}")  # fmt: skip
    figures["shadow cost"] = c = shadow_cost(args.bundle, args, work)
    print("shadow cost:", json.dumps(c))
    print(f"  req/s with a shadow at 0.1 / none {c['ratio']['shadow 0.1']:.3f} (goal >= 0.9), at 1.0 "
          f"{c['ratio']['shadow 1.0']:.3f}; copies dropped at 1.0: {c['dropped']['shadow 1.0']}")  # fmt: skip
    return figures


def repository(args: argparse.Namespace, work: Path) -> dict:
    figures = {"memory": memory(args.bundle, args, work)}
    print("memory:", json.dumps(figures["memory"]))
    figures["swap"] = s = swap(args.bundle, args, work)
    print("swap:", json.dumps(s))
    goal = 2 * args.poll + figures["memory"]["load_s"]
    print(f"  failed {s['failed']} of {s['requests']} (goal 0); version 2 served {s['appear_to_serve_s']} s after "
          f"it appeared (goal < 2 x {args.poll:g} + load {figures['memory']['load_s']} = {goal:.2f} s); "
          f"throughput during / before {s['req_per_s_during'] / s['req_per_s_before']:.3f}")  # fmt: skip
    figures["two models"] = two_models(args.bundle, args, work)
    print("two models:", json.dumps(figures["two models"]))
    return figures


if __name__ == "__main__":
    main()
