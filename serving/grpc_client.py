"""Deprecated: the gRPC client is `modelship.grpc_client`. This name goes in the next release."""

import warnings

from modelship.grpc_client import GRPCClient, connect

__all__ = ["GRPCClient", "connect"]

warnings.warn(
    "modelship.serving.grpc_client is deprecated and goes in the next release; import modelship.grpc_client",
    DeprecationWarning,
    stacklevel=2,
)
