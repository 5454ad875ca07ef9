"""Quark's ``quark.onnx.quant_utils`` names: PowerOfTwoMethod, VitisQuantType,
VitisQuantFormat (and their newer names ExtendedQuantType, ExtendedQuantFormat), with
onnxruntime's QuantType and QuantFormat."""
from onnxruntime.quantization.quant_utils import QuantFormat, QuantType

from ..compat import ExtendedQuantFormat, ExtendedQuantType, PowerOfTwoMethod, VitisQuantFormat, VitisQuantType

__all__ = ["PowerOfTwoMethod", "VitisQuantType", "VitisQuantFormat", "ExtendedQuantType", "ExtendedQuantFormat",
           "QuantType", "QuantFormat"]
