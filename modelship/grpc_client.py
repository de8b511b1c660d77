"""The client for `grpc://HOST:PORT`: KServe v2 inference over gRPC (`modelship predict --url grpc://...`).

`connect(url)` gives this for a grpc:// URL and the HTTP `Client` otherwise; both have `health()` and `infer()`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import numpy as np

from modelship.client import Client
from modelship.errors import ClientError

SERVICE = "/inference.GRPCInferenceService/"
STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 413,
          "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}  # fmt: skip


def connect(url: str, api_key: str | None = None, timeout: float = 30.0) -> Client | GRPCClient:
    return GRPCClient(url, api_key, timeout) if url.startswith("grpc://") else Client(url, api_key, timeout)


class GRPCClient:
    """Calls inference.GRPCInferenceService of one server (modelship, Triton, KServe)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0):
        import grpc

        parts = urlsplit(url)
        if parts.scheme != "grpc" or not parts.hostname or parts.port is None or parts.path not in ("", "/"):
            raise ClientError(f"--url {url} is not a gRPC address; expected grpc://HOST:PORT", 400)
        self.url, self.timeout = url, timeout
        self.target = f"{parts.hostname}:{parts.port}"
        self.metadata = (("x-api-key", api_key),) if api_key else None
        self.channel = grpc.insecure_channel(self.target, options=[("grpc.max_receive_message_length", -1),
                                                                   ("grpc.max_send_message_length", -1)])  # fmt: skip

    def _call(self, method: str, request: Any, reply: Any) -> Any:
        import grpc

        stub = self.channel.unary_unary(SERVICE + method, request_serializer=type(request).SerializeToString,
                                        response_deserializer=reply.FromString)  # fmt: skip
        try:
            return stub(request, timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            code, detail = e.code(), e.details()
            if code == grpc.StatusCode.UNAVAILABLE and "connect" in (detail or "").lower():
                raise ClientError(f"cannot reach {self.url} ({detail}); is `modelship serve --grpc-port` running "
                                  "there?") from None  # fmt: skip
            raise ClientError(f"{method}: {code.name}: {detail}", STATUS.get(code.name)) from None

    def health(self) -> bool:
        """True once the server can answer."""
        from modelship.protos import inference_pb2 as pb

        return bool(self._call("ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse).ready)

    def infer(self, model: str, batch: np.ndarray, binary: bool = True, input_name: str = "input",
              output_name: str = "logits") -> np.ndarray:  # fmt: skip
        """ModelInfer on a batch [N, C, H, W] (raw_input_contents; `binary=False` sends typed fp32_contents);
        returns the logits [N, num_classes]."""
        from modelship.protos import inference_pb2 as pb

        x = np.ascontiguousarray(batch, dtype="<f4")
        request = pb.ModelInferRequest(model_name=model)
        tensor = request.inputs.add(name=input_name, datatype="FP32", shape=x.shape)
        if binary:
            request.raw_input_contents.append(x.tobytes())
        else:
            tensor.contents.fp32_contents.extend(x.ravel().tolist())
        request.outputs.add(name=output_name)
        reply = self._call("ModelInfer", request, pb.ModelInferResponse)
        out = reply.outputs[0]
        if reply.raw_output_contents:
            return np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(tuple(out.shape))
        return np.asarray(out.contents.fp32_contents, np.float32).reshape(tuple(out.shape))

    def close(self) -> None:
        self.channel.close()
