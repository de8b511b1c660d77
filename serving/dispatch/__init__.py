"""How a validated request reaches a model and its answer comes back: the transport to the inference workers, the
broker that hands them batches, the worker itself, and the in-process runner that replaces all three."""
