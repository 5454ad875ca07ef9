"""Quark's ``quark.onnx.quantization``: ModelQuantizer, Config, QuantizationConfig."""
from ...compat import Config, ModelQuantizer, QuantizationConfig

__all__ = ["ModelQuantizer", "Config", "QuantizationConfig"]
