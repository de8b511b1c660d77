"""Every GPU check in one call, for the session that is lent a device; `--dry-run` runs the same code on the CPU.

Here, once, before the call (LitServe and the small packages the device image lacks, as Python 3.12 wheels):

    python3 benchmarks/gpu_check.py --fetch-wheels .whl        # .whl/ is git-ignored

Then the `device` tool's run, from the repository root, with carry [".whl"] and timeout_s 540:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
        .whl/*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT

Every check is written to OUT/gpu_check.json and OUT/gpu_check.md as soon as it ends, so a run cut short still
brings back what it measured; a check that cannot run here says why, and the others go on. `--budget` (seconds,
default 420) leaves out the checks that would start after it. The checks, in order:

1. environment: Python, torch, torchvision, onnx, ONNX Runtime and its providers, the GPU, LitServe.
2. gpu tests: `pytest -m gpu` (the tests that skip without CUDA).
3. train step: the pure step (benchmarks/step_bench.py) in fp32, bf16 and fp16 with channels_last, samples/s.
4. train: `modelship train --device cuda --amp off|bf16|fp16` on the 28x28 grayscale folder of
   benchmarks/train_bench.py against the tutorial loop (benchmarks/tutorial_train.py) on CUDA, whole processes:
   wall time, training samples/s, best validation accuracy.
5. export parity: `modelship export` of the CUDA-trained checkpoint, then its exact formats (torchscript, pt2) run
   on CUDA against the eager model on CUDA with TF32 off, at the export's tolerances; ONNX Runtime's CUDA provider
   in the export's own parity run when it is there.
6. serve: `modelship serve --device cuda` of resnet18 at 224 (random weights: no download) on the torch backends
   (pt2, torchscript), one request per batch (--max-batch-size 1) against dynamic batching, 32 clients of KServe v2
   binary requests, and the same backend in this process on full batches (the ceiling).
7. onnxruntime cuda: ONNX Runtime's CUDA provider against torch on the same resnet18, or a line saying it is not
   there (the device image's onnxruntime is the CPU build; onnxruntime-gpu is too large to carry).

`--dry-run` (what the test suite runs, so the script never rots): the same checks on the CPU, on a tiny folder, one
epoch, resnet18 at 32x32, a second of load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import serve_bench  # noqa: E402  (its ENV keeps a PYTHONPATH given, the carried wheels' /tmp/site)

# what the device image lacks for `modelship serve` (its package list: the device tool's KINDS.md), pinned to the
# versions the test suite runs here; pure Python but for pydantic-core, pyzmq and httptools
WHEELS = (
    "litserve==0.2.19", "fastapi==0.165.0", "starlette==1.10.0", "uvicorn==0.54.0", "pydantic==2.14.4",
    "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5", "opentelemetry-api==1.45.2",
    "pyzmq==27.3.0", "httptools==0.9.0", "python-multipart==0.0.34",
)  # fmt: skip
WHEEL_PLATFORMS = (
    *(f"manylinux_2_{n}_x86_64" for n in (17, 24, 26, 27, 28, 31, 34, 35)), "manylinux2014_x86_64", "manylinux1_x86_64",
)  # fmt: skip


class Skip(Exception):
    """This check cannot run here; the message says why."""


@dataclass(frozen=True)
class Plan:
    device: str
    folder: str  # a benchmarks/train_bench.py folder
    epochs: int
    amps: tuple[str, ...]  # modelship train --amp values
    step_seconds: float
    rounds: int
    serve_rounds: int
    backends: tuple[str, ...]  # served torch backends
    load_seconds: float
    warmup: float
    clients: int
    resnet_size: int
    budget: float


def plan_for(args: argparse.Namespace) -> Plan:
    if args.dry_run:
        return Plan(
            device="cpu",
            folder="tiny",
            epochs=1,
            amps=("off",),
            step_seconds=0.2,
            rounds=1,
            serve_rounds=1,
            backends=("pt2",),
            load_seconds=1.0,
            warmup=0.3,
            clients=8,
            resnet_size=32,
            budget=args.budget,
        )
    return Plan(device="cuda", folder="gray", epochs=5, amps=("off", "bf16", "fp16"), step_seconds=2.0, rounds=2,
                serve_rounds=1, backends=("pt2", "torchscript"), load_seconds=8.0, warmup=2.0, clients=32,
                resnet_size=224, budget=args.budget)  # fmt: skip


# ------------------------------------------------------------------------------------------------ the checks


def environment(plan: Plan, work: Path, found: dict) -> dict:
    import onnx
    import onnxruntime as ort
    import torch
    import torchvision

    out: dict[str, Any] = {
        "python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "torchvision": torchvision.__version__, "onnx": onnx.__version__,
        "onnxruntime": ort.__version__, "onnxruntime_providers": ort.get_available_providers(),
        "cuda": torch.cuda.is_available(),
    }  # fmt: skip
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability(0))
    try:
        import litserve

        out["litserve"] = litserve.__version__
    except ImportError:
        out["litserve"] = None
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device here; run it on the lent machine, or --dry-run")
    return out


def gpu_tests(plan: Plan, work: Path, found: dict) -> dict:
    """pytest -m gpu; a module that cannot be imported here (a test dependency the image lacks) is reported, and
    the gpu tests of the others still run."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", "tests"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=serve_bench.ENV, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    problems = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    if proc.returncode not in (0, 1) or not lines:  # 1: some failed (listed); else pytest itself could not run
        raise RuntimeError(f"pytest exited {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-1500:]}")
    return {"exit_code": proc.returncode, "summary": lines[-1], "problems": problems}


def train_step(plan: Plan, work: Path, found: dict) -> dict:
    import step_bench

    shape, batch = (1, 28, 28), 64  # the folder `train` uses, at modelship train's default batch
    amps = ("fp32", "bf16", "fp16") if plan.device == "cuda" else ("fp32",)
    rates: dict[str, list[float]] = {amp: [] for amp in amps}
    for _ in range(plan.rounds):
        for amp in amps:
            step = step_bench.stepper(shape, amp, True, batch, plan.device)
            rates[amp].append(step_bench.rate(step, batch, plan.step_seconds, plan.device))
    fp32 = statistics.median(rates["fp32"])
    return {
        "shape": list(shape), "batch": batch, "channels_last": True,
        "samples_per_s": {amp: round(statistics.median(r), 1) for amp, r in rates.items()},
        "vs_fp32": {amp: round(statistics.median(r) / fp32, 2) for amp, r in rates.items()},
    }  # fmt: skip


def train(plan: Plan, work: Path, found: dict) -> dict:
    """The tutorial loop and `modelship train` per --amp, alternated over the rounds, whole processes."""
    import train_bench

    train_bench.FOLDERS.setdefault("tiny", (28, 240, 60, "L", "png"))
    folder = train_bench.write_folder(work / "data", plan.folder)
    runs: dict[str, list[dict]] = {}
    for r in range(plan.rounds):
        wall, out = timed([sys.executable, "benchmarks/tutorial_train.py", str(folder), "--epochs",
                           str(plan.epochs), "--device", plan.device])  # fmt: skip
        result = json.loads(out.strip().splitlines()[-1])
        runs.setdefault("tutorial loop", []).append({"wall_s": wall, "samples_per_s": result["samples_per_s"],
                                                     "best_val_acc": result["best_val_acc"]})  # fmt: skip
        for amp in plan.amps:
            run = work / f"train-{amp}-{r}"
            wall, _ = timed([sys.executable, "-m", "modelship.cli", "train", "--data", str(folder), "--model", "cnn",
                             "--epochs", str(plan.epochs), "--device", plan.device, "--amp", amp, "--cache-dir",
                             str(work / "cache"), "--out", str(run)])  # fmt: skip
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            runs.setdefault(f"modelship train --amp {amp}", []).append({
                "wall_s": wall, "samples_per_s": statistics.median(row["samples_per_s"] for row in rows),
                "best_val_acc": max(row["val_acc"] for row in rows)})  # fmt: skip
            found["checkpoint"] = run / "checkpoints" / "best.pt"  # the last one trained goes on to export
    base = {k: statistics.median(x[k] for x in runs["tutorial loop"]) for k in ("wall_s", "samples_per_s")}
    table = {}
    for name, xs in runs.items():
        wall, rate = (statistics.median(x[k] for x in xs) for k in ("wall_s", "samples_per_s"))
        table[name] = {"wall_s": round(wall, 2), "samples_per_s": round(rate, 1),
                       "best_val_acc": statistics.median(x["best_val_acc"] for x in xs),
                       "wall_speedup": round(base["wall_s"] / wall, 2),
                       "samples_speedup": round(rate / base["samples_per_s"], 2)}  # fmt: skip
    return {"folder": plan.folder, "epochs": plan.epochs, "rounds": plan.rounds, "runs": table}


def export_parity(plan: Plan, work: Path, found: dict) -> dict:
    if "checkpoint" not in found:
        raise Skip("no checkpoint: the train check did not run")
    import torch

    from modelship.export import parity
    from modelship.export.source import load_source

    bundle = work / "bundle-cnn"
    wall, _ = timed([sys.executable, "-m", "modelship.cli", "export", str(found["checkpoint"]), "--out", str(bundle),
                     "--formats", "onnx,torchscript,pt2", "--device", "auto", "--force"])  # fmt: skip
    manifest = json.loads((bundle / "manifest.json").read_text())
    gate = manifest["parity"]
    torch.backends.cuda.matmul.allow_tf32 = False  # parity compares true fp32, as the export's CUDA provider run
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(plan.device)
    model = load_source(found["checkpoint"], {}).model.to(dev).eval()
    runners = {
        "torchscript": torch.jit.load(str(bundle / manifest["artifacts"]["torchscript"]["path"]), map_location=dev),
        "pt2": torch.export.load(str(bundle / manifest["artifacts"]["pt2"]["path"])).module().to(dev),
    }
    rng = np.random.default_rng(0)
    checks = {}
    for n in gate["batch_sizes"]:
        x = torch.from_numpy(rng.standard_normal((n, *manifest["input"]["shape"][1:])).astype(np.float32)).to(dev)
        with torch.inference_mode():
            ref = model(x).float().cpu().numpy()
            for kind, module in runners.items():
                checks[f"{kind}, batch {n}"] = parity.compare(ref, module(x).float().cpu().numpy(), gate["atol"],
                                                              gate["rtol"])  # fmt: skip
    report = json.loads((bundle / gate["report"]).read_text())
    runtimes = sorted({c["runtime"] for c in report["checks"]})
    return {"export_wall_s": round(wall, 1), "export_parity_passed": gate["passed"], "export_runtimes": runtimes,
            "on_device": plan.device, "atol": gate["atol"], "rtol": gate["rtol"],
            "passed": all(c["passed"] for c in checks.values()),
            "max_abs_err": max(c["max_abs_err"] for c in checks.values()),
            "min_top1_agreement": min(c["top1_agreement"] for c in checks.values()),
            "checks": {k: f"max_abs_err {c['max_abs_err']:.2e}, top-1 {c['top1_agreement']:.4f}, "
                          f"{'passed' if c['passed'] else 'FAILED'}" for k, c in checks.items()}}  # fmt: skip


def serve(plan: Plan, work: Path, found: dict) -> dict:
    try:
        import litserve  # noqa: F401
    except ImportError:
        raise Skip("LitServe is not installed here: carry the wheels (--fetch-wheels) and install them first") from None

    bundle = resnet_bundle(plan, work)
    found["resnet"] = bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    path, body, headers = serve_bench.payloads(manifest)["v2-binary"]
    rows: dict[str, list[float]] = {}
    for _ in range(plan.serve_rounds):  # one round of ~2 minutes on the GPU: a server starts in ~15 s
        for backend in plan.backends:
            rows.setdefault(f"{backend} in-process, batch 32", []).append(inprocess(bundle, backend, 32, plan))
            for name, extra in (("batch 1", ["--max-batch-size", "1"]), ("dynamic batching", [])):
                port = serve_bench.free_port()
                cmd = [*serve_bench.serve_cmd(bundle, port, ""), "--backend", backend, "--device", plan.device, *extra]
                with serve_bench.started(cmd, port):
                    r = serve_bench.run_load(f"http://127.0.0.1:{port}{path}", body, headers, plan.clients,
                                             plan.load_seconds, plan.warmup)  # fmt: skip
                if r.errors:
                    raise RuntimeError(f"{backend} served with {name}: {r.errors} errors of {r.requests}")
                rows.setdefault(f"{backend} served, {name}", []).append(r.throughput)
    rates = {k: round(statistics.median(v), 1) for k, v in rows.items()}
    ratios = {}
    for b in plan.backends:
        dynamic = rates[f"{b} served, dynamic batching"]
        ratios[f"{b}: dynamic batching / batch 1"] = round(dynamic / rates[f"{b} served, batch 1"], 2)
        ratios[f"{b}: served / in-process"] = round(dynamic / rates[f"{b} in-process, batch 32"], 2)
    return {"model": f"resnet18 3x{plan.resnet_size}x{plan.resnet_size}", "clients": plan.clients,
            "seconds": plan.load_seconds, "images_per_s": rates, "ratios": ratios}  # fmt: skip


def onnxruntime_cuda(plan: Plan, work: Path, found: dict) -> dict:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        raise Skip(f"onnxruntime {ort.__version__} here is the CPU build (providers: {', '.join(providers)}); "
                   "onnxruntime-gpu is too large to carry, so its CUDA provider is not measured")  # fmt: skip
    bundle = found.get("resnet") or resnet_bundle(plan, work)
    out = {}
    for kind in ("onnx", "pt2"):  # the same resnet18 on ONNX Runtime and on torch, batches of 32
        rate, ran_on = inprocess(bundle, kind, 32, plan, providers=True)
        out[f"{kind} images/s ({ran_on[0]})"] = rate
        if plan.device == "cuda" and kind == "onnx" and ran_on[0] == "CPUExecutionProvider":
            raise RuntimeError("ONNX Runtime lists its CUDA provider but could not load it (the log says why)")
    return out


CHECKS: tuple[tuple[str, Callable[[Plan, Path, dict], dict]], ...] = (
    ("environment", environment), ("gpu tests", gpu_tests), ("train step", train_step), ("train", train),
    ("export parity", export_parity), ("serve", serve), ("onnxruntime cuda", onnxruntime_cuda),
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ helpers


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=serve_bench.ENV, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:4])} ... exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return time.perf_counter() - t0, proc.stdout


def resnet_bundle(plan: Plan, work: Path) -> Path:
    """resnet18 with seeded random weights (no download), exported to onnx and the served torch backends."""
    bundle = work / "bundle-resnet18"
    if (bundle / "manifest.json").is_file():
        return bundle
    import torch
    import torchvision

    torch.manual_seed(0)
    state = work / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), state)
    size = plan.resnet_size
    timed([sys.executable, "-m", "modelship.cli", "export", str(state), "--out", str(bundle), "--model", "resnet18",
           "--input-shape", f"3,{size},{size}", "--formats", ",".join(("onnx", *plan.backends)), "--max-batch", "32",
           "--device", "cpu"])  # fmt: skip
    return bundle


def inprocess(bundle: Path, kind: str, batch: int, plan: Plan, providers: bool = False) -> Any:
    """A bundle's artifact through modelship's own backend in this process, on full batches: images/s (and the
    providers that ran it)."""
    from modelship.backends import load_backend

    manifest = json.loads((bundle / "manifest.json").read_text())
    device = "cuda:0" if plan.device == "cuda" else "cpu"
    backend = load_backend(kind, bundle / manifest["artifacts"][kind]["path"], device, os.cpu_count() or 1)
    x = np.random.default_rng(0).standard_normal((batch, *manifest["input"]["shape"][1:])).astype(np.float32)
    for _ in range(3):
        backend(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < plan.load_seconds / 2:
        backend(x)  # returns numpy: the copy back synchronises the device
        n += batch
    rate = round(n / (time.perf_counter() - t0), 1)
    return (rate, backend.providers[:1]) if providers else rate


def markdown(results: dict[str, dict]) -> str:
    """One table per check: its figures flattened to key / value rows."""
    out = ["# gpu_check", ""]
    for name, result in results.items():
        out += [f"## {name} ({result['status']}, {result['seconds']:.0f} s)", ""]
        if result["status"] != "ok":
            out += [result["why"], ""]
            continue
        out += ["| what | value |", "| --- | --- |"]
        out += [f"| {k} | {v} |" for k, v in flat(result["figures"])]
        out.append("")
    return "\n".join(out)


def flat(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in flat(v, f"{prefix}{k} / " if prefix or k else k)]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [row for i, v in enumerate(value) for row in flat(v, f"{prefix}{i} / ")]
    return [(prefix.removesuffix(" / "), value)]


def run_checks(plan: Plan, out: Path, work: Path) -> dict[str, dict]:
    start, found, results = time.monotonic(), {}, {}
    for name, check in CHECKS:
        t0 = time.monotonic()
        if t0 - start > plan.budget:
            results[name] = {"status": "skipped", "why": f"left out: past the --budget of {plan.budget:g} s"}
        else:
            print(f"gpu_check: {name} ...", flush=True)
            try:
                results[name] = {"status": "ok", "figures": check(plan, work, found)}
            except Skip as e:
                results[name] = {"status": "skipped", "why": str(e)}
            except Exception as e:
                results[name] = {"status": "failed", "why": f"{type(e).__name__}: {e}",
                                 "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
        results[name]["seconds"] = round(time.monotonic() - t0, 1)
        print(f"gpu_check: {name}: {results[name]['status']} ({results[name]['seconds']} s)", flush=True)
        (out / "gpu_check.json").write_text(json.dumps({"plan": plan.__dict__, "results": results}, indent=1,
                                                       default=str) + "\n")  # fmt: skip
        (out / "gpu_check.md").write_text(markdown(results) + "\n")
    return results


def fetch_wheels(folder: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *(f"--platform={p}" for p in WHEEL_PLATFORMS), "-d", str(folder),
           *WHEELS]  # fmt: skip
    subprocess.run(cmd, check=True)
    print(f"{len(list(folder.glob('*.whl')))} wheels in {folder}; carry {folder} to the device call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")))
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no check starts")
    parser.add_argument("--dry-run", action="store_true", help="every check on the CPU, tiny sizes")
    parser.add_argument("--fetch-wheels", type=Path, metavar="DIR", help="download the wheels to carry, and stop")
    args = parser.parse_args()
    if args.fetch_wheels:
        fetch_wheels(args.fetch_wheels)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        results = run_checks(plan_for(args), args.out, work)
    failed = [name for name, r in results.items() if r["status"] == "failed"]
    print(f"gpu_check: {len(results) - len(failed)} of {len(results)} checks ran or said why not; results in "
          f"{args.out}/gpu_check.md" + (f"; failed: {', '.join(failed)}" if failed else ""))  # fmt: skip
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
