"""modelship: train -> export -> serve for PyTorch image classifiers."""

__version__ = "0.2.0"
