"""Stage 1: datasets, the model registry, the training loop and checkpoints."""
