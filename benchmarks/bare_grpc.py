"""The gRPC ceilings: a bare grpc.aio server of inference.GRPCInferenceService that parses each ModelInfer request (as
modelship does) and answers a fixed ModelInferResponse. Nothing a gRPC server could do per request costs less.

    python benchmarks/bare_grpc.py --port 8003 [--workers 2] [--classes 5] [--bundle DIR]

With `--bundle`, each request's image goes through the bundle's ONNX model instead: queued for a thread that runs
what is waiting (up to 32) as one batch on ONNX Runtime (one thread) and hands the logits back to the event loop once
per batch, as `--in-process` does, with none of modelship's checks, metrics or timeouts: the most a server that runs
this model can answer on this machine (the model's compute comes on top of the bare ceiling on the same cores).

`--workers` processes, each with its own SO_REUSEPORT socket and event loop (uvloop), as modelship's API servers.
It answers ServerReady, so the same readiness check starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing as mp
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelship.protos import inference_pb2 as pb


def model_runner(bundle: Path) -> Callable[[np.ndarray], Awaitable[np.ndarray]]:
    """An awaitable forward pass of one image [C, H, W] -> its logits, batched on a thread of this process."""
    from modelship.backends import onnx_backend

    manifest = json.loads((bundle / "manifest.json").read_text())
    backend = onnx_backend(bundle / manifest["artifacts"]["onnx"]["path"], "cpu", 1)
    loop = asyncio.get_running_loop()
    queue: collections.deque[tuple[np.ndarray, asyncio.Future]] = collections.deque()
    waiting = threading.Condition()

    def settle(answers: list[tuple[asyncio.Future, np.ndarray]]) -> None:
        for future, logits in answers:
            future.set_result(logits)

    def run() -> None:
        while True:
            with waiting:
                while not queue:
                    waiting.wait()
                batch = [queue.popleft() for _ in range(min(32, len(queue)))]
            logits = backend(np.stack([x for x, _ in batch]))
            loop.call_soon_threadsafe(settle, [(f, y) for (_, f), y in zip(batch, logits, strict=True)])

    threading.Thread(target=run, daemon=True).start()

    async def forward(x: np.ndarray) -> np.ndarray:
        future = loop.create_future()
        with waiting:
            queue.append((x, future))
            waiting.notify()
        return await future

    return forward


async def serve(port: int, classes: int, bundle: Path | None) -> None:
    import grpc

    answer = pb.ModelInferResponse(model_name="bare", model_version="1")
    answer.outputs.add(name="logits", datatype="FP32", shape=[1, classes])
    answer.raw_output_contents.append(b"\0" * 4 * classes)
    fixed = answer.SerializeToString()
    forward = model_runner(bundle) if bundle is not None else None

    async def infer(raw: bytes, context: object) -> bytes:
        request = pb.ModelInferRequest.FromString(raw)
        if forward is None:
            return fixed
        x = np.frombuffer(request.raw_input_contents[0], np.float32).reshape(request.inputs[0].shape[1:])
        logits = await forward(x)
        response = pb.ModelInferResponse(model_name="bare", model_version="1")
        response.outputs.add(name="logits", datatype="FP32", shape=[1, len(logits)])
        response.raw_output_contents.append(logits.astype("<f4").tobytes())
        return response.SerializeToString()

    async def ready(raw: bytes, context: object) -> bytes:
        return pb.ServerReadyResponse(ready=True).SerializeToString()

    server = grpc.aio.server(options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", 64 << 20)])
    methods = {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
               "ServerReady": grpc.unary_unary_rpc_method_handler(ready)}  # fmt: skip
    server.add_registered_method_handlers("inference.GRPCInferenceService", methods)  # as modelship registers them
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def run(port: int, classes: int, bundle: Path | None) -> None:
    import uvloop

    uvloop.run(serve(port, classes, bundle))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument("--workers", type=int, default=2, help="processes, as many as modelship's API servers")
    parser.add_argument("--classes", type=int, default=5, help="the fixed answer's logits")
    parser.add_argument("--bundle", type=Path, help="run each image through this bundle's ONNX model")
    args = parser.parse_args()
    procs = [mp.get_context("spawn").Process(target=run, args=(args.port, args.classes, args.bundle))
             for _ in range(args.workers)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join()
