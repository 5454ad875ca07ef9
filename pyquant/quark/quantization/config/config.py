"""Quark's ``quark.onnx.quantization.config.config``: Config and QuantizationConfig."""
from ....compat import Config, QuantizationConfig

__all__ = ["Config", "QuantizationConfig"]
