"""Offline scoring: `modelship predict --engine ray` (a local Ray cluster started for the run) against local
`predict --bundle`, whole commands as a user runs them, alternated over --rounds; and the peak memory of the Ray
run's driver and actors as the number of images grows.

    python benchmarks/batch_bench.py [--rounds 2] [--resnet-images 2000] [--small-images 20000]
        [--memory-at 5000,20000] [--bundle runs/quickstart/bundle]

- resnet18 at 224 (seeded random weights, ONNX), --resnet-images 256x256 JPEGs: compute-bound, where the engine's
  overhead should vanish (goal: Ray at least 0.8 of local on one 2-core machine).
- the small cnn (--bundle, the quickstart's), --small-images 32x32 PNGs (the shapes validation images, repeated
  under new names): overhead-bound; where the time goes is measured apart: decoding and preprocessing every image,
  and the model on batches of 64.
- for both, a Ray cluster's start and stop with nothing to run (the engine's fixed cost), and the ratio without it.
- memory: the peak resident memory (VmHWM) of the Ray run's driver and of each actor, at each --memory-at count of
  small images (goal: flat).

Each figure is images / wall seconds of the whole command, its start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def modelship(*args: str) -> list[str]:
    return [sys.executable, "-m", "modelship.cli", *args]


def resnet_bundle(work: Path) -> Path:
    import torch
    import torchvision

    torch.manual_seed(0)
    state = work / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), state)
    bundle = work / "resnet18"
    subprocess.run(modelship("export", str(state), "--out", str(bundle), "--model", "resnet18", "--input-shape",
                             "3,224,224", "--formats", "onnx", "--max-batch", "32", "--device", "cpu"),
                   check=True, capture_output=True)  # fmt: skip
    return bundle


def photos(folder: Path, n: int) -> Path:
    """n 256x256 JPEGs: smooth gradients with noise, each its own."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32) / 255
    for i in range(n):
        sub = folder / f"c{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0, 255, 3)
        img = np.stack([a * xx, b * yy, c * (1 - xx)], axis=2) + rng.normal(0, 12, (256, 256, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(sub / f"{i:06d}.jpg", quality=90)
    return folder


def small_images(folder: Path, source: Path, n: int) -> Path:
    """n 32x32 PNGs: the shapes validation images, copied under new names until there are n."""
    originals = sorted(source.rglob("*.png"))
    for i in range(n):
        sub = folder / f"c{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(originals[i % len(originals)], sub / f"{i:06d}.png")
    return folder


def peak_memory(root_pid: int, stop: threading.Event, seen: dict[int, tuple[str, int]]) -> None:
    """Every 0.2 s, each process under root_pid: its name ("driver" for root_pid) and peak resident memory (VmHWM,
    kB)."""
    while not stop.is_set():
        children: dict[int, list[int]] = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(d.name))
        todo = [root_pid]
        while todo:
            pid = todo.pop()
            todo += children.get(pid, [])
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")), 0)
            seen[pid] = ("driver" if pid == root_pid else name, max(hwm, seen.get(pid, ("", 0))[1]))
        stop.wait(0.2)


def timed(cmd: list[str], watch: bool = False) -> tuple[float, dict[int, tuple[str, int]]]:
    seen: dict[int, tuple[str, int]] = {}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, **LOOPBACK})  # fmt: skip
    stop = threading.Event()
    sampler = threading.Thread(target=peak_memory, args=(proc.pid, stop, seen)) if watch else None
    if sampler:
        sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    if sampler:
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return seconds, seen


def contest(bundle: Path, images: Path, n: int, rounds: int, work: Path) -> dict:
    """images/s of local predict and of --engine ray on the same folder, alternated."""
    runs: dict[str, list[float]] = {"local": [], "ray": []}
    for r in range(rounds):
        for engine in ("local", "ray"):
            out = work / f"out-{engine}-{r}"
            args = ["predict", "--bundle", str(bundle), str(images), "--output", str(out), "--format", "csv"]
            seconds, _ = timed(modelship(*args, *(["--engine", "ray"] if engine == "ray" else [])))
            runs[engine].append(round(n / seconds, 1))
            print(f"  {engine}: {n / seconds:.1f} images/s ({seconds:.1f} s)", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    fixed = statistics.median(empty_ray_run() for _ in range(rounds))
    steady = n / (n / med["ray"] - fixed)  # the same run without the cluster's start and stop
    return {"images": n, "images_per_s": med, "rounds": runs, "ray / local": round(med["ray"] / med["local"], 3),
            "empty_ray_run_s": round(fixed, 2), "ray without it / local": round(steady / med["local"], 3)}  # fmt: skip


def where_the_time_goes(bundle: Path, images: Path) -> dict:
    """Serial decoding + preprocessing, the model on batches of 64, and an empty Ray cluster's start and stop."""
    from modelship.backends import load_backend
    from modelship.imagefolder import images_under, open_image
    from modelship.manifest import check_bundle
    from modelship.preprocess import Preprocess, preprocess_image

    manifest = check_bundle(bundle)
    pre = Preprocess.from_dict(manifest["preprocess"])
    files = images_under(images)
    start = time.perf_counter()
    x = np.stack([preprocess_image(open_image(f), pre) for f in files])
    decode = time.perf_counter() - start
    run = load_backend("onnx", bundle / manifest["artifacts"]["onnx"]["path"], "cpu", os.cpu_count() or 1)
    start = time.perf_counter()
    for i in range(0, len(x), 64):
        run(x[i : i + 64])
    model = time.perf_counter() - start
    return {"decode_preprocess_s": round(decode, 2), "model_s": round(model, 2)}


def empty_ray_run() -> float:
    """Seconds to import Ray, start a local cluster and stop it with nothing to run: the engine's fixed cost."""
    code = "import ray; ray.init(_node_ip_address='127.0.0.1', include_dashboard=False); ray.shutdown()"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env={**os.environ, **LOOPBACK})
    return time.perf_counter() - start


def memory(bundle: Path, source: Path, counts: list[int], work: Path) -> dict:
    out = {}
    for n in counts:
        images = small_images(work / f"mem-{n}", source, n)
        seconds, seen = timed(modelship("predict", "--engine", "ray", "--bundle", str(bundle), str(images),
                                        "--output", str(work / f"mem-out-{n}")), watch=True)  # fmt: skip
        procs = sorted(seen.items())
        driver = next((kb for _, (name, kb) in procs if name == "driver"), 0)
        actors = [kb for _, (name, kb) in procs if "MapWorker" in name or "Scorer" in name]
        out[n] = {"seconds": round(seconds, 1), "driver_mib": round(driver / 1024, 1),
                  "actors_mib": [round(kb / 1024, 1) for kb in actors],
                  "largest_mib": round(max(kb for _, (_, kb) in procs) / 1024, 1)}  # fmt: skip
        print(f"  {n} images: {json.dumps(out[n])}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--resnet-images", type=int, default=2000)
    p.add_argument("--small-images", type=int, default=20000)
    p.add_argument("--memory-at", default="5000,20000")
    p.add_argument("--bundle", type=Path, default=REPO / "runs" / "quickstart" / "bundle")
    p.add_argument("--shapes", type=Path, help="the shapes images to copy (default: the quickstart's data)")
    p.add_argument("--only", choices=("all", "resnet", "small", "memory"), default="all")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    shapes = args.shapes or next((Path.home() / ".cache" / "modelship" / "data").glob("shapes-*/val"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only in ("all", "resnet"):
            print(f"resnet18 at 224, {args.resnet_images} JPEGs:")
            images = photos(work / "photos", args.resnet_images)
            figures["resnet18"] = contest(resnet_bundle(work), images, args.resnet_images, args.rounds, work)
            print(json.dumps(figures["resnet18"]))
        if args.only in ("all", "small"):
            print(f"small cnn, {args.small_images} 32x32 PNGs:")
            images = small_images(work / "small", shapes, args.small_images)
            figures["small cnn"] = contest(args.bundle, images, args.small_images, args.rounds, work)
            figures["small cnn"]["where the time goes"] = where_the_time_goes(args.bundle, images)
            print(json.dumps(figures["small cnn"]))
        if args.only in ("all", "memory"):
            print("memory of the Ray run (peak RSS):")
            counts = [int(v) for v in args.memory_at.split(",")]
            figures["memory"] = memory(args.bundle, shapes, counts, work)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
