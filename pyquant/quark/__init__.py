"""AMD Quark's ONNX API (``quark.onnx``) over pyquant: the one edit a Quark script needs is
``quark.onnx`` -> ``pyquant.quark`` in its import lines.

The modules mirror Quark's layout (quark.onnx, .quant_utils, .quantization,
.quantization.api, .quantization.config, .quantization.config.config,
.quantization.config.custom_config, .quantization.quant_utils) and re-export
pyquant.compat, where the translation lives; as in Quark, onnxruntime's CalibrationMethod,
CalibrationDataReader, QuantType and QuantFormat are re-exported unchanged. What each
field and key does here: README, "Quark drop-in".
"""
from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.quant_utils import QuantFormat, QuantType

from ..compat import (Config, ExtendedQuantFormat, ExtendedQuantType, ModelQuantizer, PowerOfTwoMethod,
                      QuantizationConfig, VitisQuantFormat, VitisQuantType, get_library_path, quantize_static)

__all__ = [
    "CalibrationDataReader", "CalibrationMethod", "QuantFormat", "QuantType", "PowerOfTwoMethod",
    "VitisQuantType", "VitisQuantFormat", "ExtendedQuantType", "ExtendedQuantFormat",
    "ModelQuantizer", "Config", "QuantizationConfig", "quantize_static", "get_library_path",
]
