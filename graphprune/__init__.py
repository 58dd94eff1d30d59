"""graphprune: prune ONNX models for sparse tensor cores."""

__version__ = "0.1.0"
