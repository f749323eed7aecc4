"""Adapters: PyTorch, Keras 3 and ONNX models behind one interface (see base.ModelAdapter)."""

from .base import ModelAdapter, NetworkModel, load_model

__all__ = ["ModelAdapter", "NetworkModel", "load_model"]
