"""Quark's ``quark.onnx.quantization.config``: Config, QuantizationConfig and
get_default_config (Quark's presets by Quark's names: pyquant.compat.QUARK_PRESETS)."""
from .config import Config, QuantizationConfig
from .custom_config import DEFAULT_ADAQUANT_PARAMS, DEFAULT_ADAROUND_PARAMS, get_default_config

__all__ = ["Config", "QuantizationConfig", "get_default_config", "DEFAULT_ADAROUND_PARAMS", "DEFAULT_ADAQUANT_PARAMS"]
