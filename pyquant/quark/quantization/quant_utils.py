"""Quark's newer ``quark.onnx.quantization.quant_utils`` (the same names as
pyquant.quark.quant_utils)."""
from ..quant_utils import (ExtendedQuantFormat, ExtendedQuantType, PowerOfTwoMethod, QuantFormat, QuantType,
                           VitisQuantFormat, VitisQuantType)

__all__ = ["PowerOfTwoMethod", "VitisQuantType", "VitisQuantFormat", "ExtendedQuantType", "ExtendedQuantFormat",
           "QuantType", "QuantFormat"]
