"""Quark's ``quark.onnx.quantization.api``: ModelQuantizer."""
from ...compat import ModelQuantizer

__all__ = ["ModelQuantizer"]
