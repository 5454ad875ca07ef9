"""Quark's ``quark.onnx.quantization.config.custom_config``: get_default_config (Quark's
presets by Quark's names, pyquant.compat.quark_default_config) and the fast finetune
parameter dicts (pyquant's defaults, pyquant.compat.DEFAULT_ADAROUND_PARAMS)."""
from ....compat import DEFAULT_ADAQUANT_PARAMS, DEFAULT_ADAROUND_PARAMS
from ....compat import quark_default_config as get_default_config

__all__ = ["get_default_config", "DEFAULT_ADAROUND_PARAMS", "DEFAULT_ADAQUANT_PARAMS"]
