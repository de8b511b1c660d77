"""Stage 2: checkpoint -> TorchScript / ONNX -> parity check -> bundle."""
