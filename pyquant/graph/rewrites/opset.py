"""Upgrade a model below the opset the QDQ format needs (13: per-axis QuantizeLinear).

onnx's version converter does the work; pyquant.preparation then checks on a calibration
batch that the upgraded model computes what the original did, and names the first node
whose output changed if not. Models at or above the target keep their opset (int16 QDQ
needs opset 21, and a newer model is never downgraded)."""
from __future__ import annotations

from typing import Tuple

from onnx import ModelProto, version_converter

from ...errors import ModelError

# QuantizeLinear/DequantizeLinear with per-axis scales need opset 13.
MIN_OPSET = 13


def default_opset(model: ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def upgrade_opset(model: ModelProto, target: int = MIN_OPSET) -> Tuple[ModelProto, int]:
    """(model at opset >= target, the opset it had). The model is returned as is when it
    is already there; ModelError naming the converter's complaint when it cannot be."""
    opset = default_opset(model)
    if opset >= target:
        return model, opset
    if opset == 0:
        raise ModelError("the model imports no default ONNX opset")
    try:
        upgraded = version_converter.convert_version(model, target)
    except Exception as e:  # the converter raises bare RuntimeErrors naming the adapter
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot upgrade the model from opset {opset} to {target}: {first}") from None
    return upgraded, opset
