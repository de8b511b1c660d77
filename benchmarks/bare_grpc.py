"""The gRPC ceiling: a bare grpc.aio server of inference.GRPCInferenceService that parses each ModelInfer request (as
modelship does) and answers a fixed ModelInferResponse. Nothing a gRPC server could do per request costs less.

    python benchmarks/bare_grpc.py --port 8003 [--workers 2] [--classes 5]

`--workers` processes, each with its own SO_REUSEPORT socket and event loop (uvloop), as modelship's API servers.
It answers ServerReady, so the same readiness check starts it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelship.serving.protos import inference_pb2 as pb


async def serve(port: int, classes: int) -> None:
    import grpc

    answer = pb.ModelInferResponse(model_name="bare", model_version="1")
    answer.outputs.add(name="logits", datatype="FP32", shape=[1, classes])
    answer.raw_output_contents.append(b"\0" * 4 * classes)
    fixed = answer.SerializeToString()

    async def infer(raw: bytes, context: object) -> bytes:
        pb.ModelInferRequest.FromString(raw)
        return fixed

    async def ready(raw: bytes, context: object) -> bytes:
        return pb.ServerReadyResponse(ready=True).SerializeToString()

    server = grpc.aio.server(options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", 64 << 20)])
    methods = {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
               "ServerReady": grpc.unary_unary_rpc_method_handler(ready)}  # fmt: skip
    server.add_registered_method_handlers("inference.GRPCInferenceService", methods)  # as modelship registers them
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def run(port: int, classes: int) -> None:
    import uvloop

    uvloop.run(serve(port, classes))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument("--workers", type=int, default=2, help="processes, as many as modelship's API servers")
    parser.add_argument("--classes", type=int, default=5, help="the fixed answer's logits")
    args = parser.parse_args()
    procs = [mp.get_context("spawn").Process(target=run, args=(args.port, args.classes)) for _ in range(args.workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
