"""The gRPC messages: `inference.proto` (the Open Inference Protocol with Triton's repository calls) and
`health.proto` (grpc.health.v1), and the Python code protoc writes from them, checked in (ARCHITECTURE.md says why).

After changing a .proto: `python -m modelship.protos.generate` (needs the dev extra's grpcio-tools);
tests/serving/test_grpc.py fails while the checked-in code differs from what it writes.
"""
