"""The pure training step: samples/s of the registry's `cnn` in fp32, bf16 and fp16 autocast, with and without
channels_last, side by side in one run.

    python benchmarks/step_bench.py [--device cpu|cuda] [--batch-size 64] [--rounds 3] [--seconds 2]

No data loading: one resident batch, forward + loss + backward + AdamW step, as `modelship train` runs it. Every
contender runs one measurement per round, in turn, and the median round is reported, so drift in a shared machine's
speed hits all alike. fp16 (with a GradScaler) is measured on CUDA only; the header says whether bf16 is native.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelship.training.models import build_model, model_kwargs
from modelship.training.runtime import native

SHAPES = ((3, 32, 32), (1, 28, 28), (3, 96, 96))  # CIFAR-, MNIST- and a larger RGB size


def stepper(shape: tuple[int, int, int], amp: str, channels_last: bool, batch: int, device: str) -> Callable[[], None]:
    torch.manual_seed(0)
    model = build_model("cnn", model_kwargs("cnn", 10, list(shape), {})).to(device)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device, enabled=amp == "fp16")

    def step() -> None:
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def rate(step: Callable[[], None], batch: int, seconds: float, device: str) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
        if device == "cuda" and n % 10 == 0:
            sync()
    sync()
    return n * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("step_bench: error: --device cuda but no CUDA device is usable here")
    amps = ["off", "bf16"] + (["fp16"] if args.device == "cuda" else [])
    contenders = [(s, a, cl) for s in SHAPES for a in amps for cl in (False, True)]
    steps = {c: stepper(*c, args.batch_size, args.device) for c in contenders}
    runs: dict[tuple, list[float]] = {c: [] for c in contenders}
    for _ in range(args.rounds):
        for c in contenders:
            runs[c].append(rate(steps[c], args.batch_size, args.seconds, args.device))
    name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.machine()}, {torch.get_num_threads()} threads"
    )
    bf16 = native("bf16", torch.device(args.device)) or "emulated"
    print(f"\n{name}, torch {torch.__version__}, bf16: {bf16}; cnn, batch {args.batch_size}; samples/s, median of "
          f"{args.rounds} rounds\n")  # fmt: skip
    print(f"{'input':<10} {'amp':<5} {'channels_last':<14} {'samples/s':>10} {'vs fp32':>8}")
    for shape, amp, cl in contenders:
        base = statistics.median(runs[(shape, "off", False)])
        got = statistics.median(runs[(shape, amp, cl)])
        print(f"{'x'.join(map(str, shape)):<10} {amp:<5} {'yes' if cl else 'no':<14} {got:>10.0f} {got / base:>7.2f}x")


if __name__ == "__main__":
    main()
