"""Quantization parameters as data: QParams of one tensor, a weight's integers, and the
table that holds them for a whole model (QuantTable). Computed by pyquant.calibrate,
read by the techniques and the QDQ writer (pyquant.graph.qdq); this module computes
nothing but QuantizeLinear/DequantizeLinear in numpy."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np

from .config import QuantType

WeightKey = Tuple[str, Optional[int]]  # (weight initializer name, channel axis or None)


@dataclasses.dataclass(frozen=True)
class QParams:
    """scale and zero_point of one tensor: scalars, or 1-D along ``axis`` (per-channel)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: Optional[int] = None

    @property
    def is_power_of_two(self) -> bool:
        exponents = np.log2(self.scale.astype(np.float64))
        return bool(np.all(exponents == np.round(exponents)))


def quantize_array(x: np.ndarray, qp: QParams, qtype: QuantType) -> np.ndarray:
    """QuantizeLinear in numpy (round half to even, saturate)."""
    scale, zp = qp.scale.astype(np.float64), qp.zero_point.astype(np.float64)
    if qp.axis is not None:
        shape = [1] * x.ndim
        shape[qp.axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    q = np.clip(np.round(x.astype(np.float64) / scale) + zp, qtype.qmin, qtype.qmax)
    return q.astype(qtype.numpy_dtype)


def dequantize_array(q: np.ndarray, qp: QParams) -> np.ndarray:
    """DequantizeLinear in numpy (float64)."""
    scale, zp = qp.scale.astype(np.float64), qp.zero_point.astype(np.float64)
    if qp.axis is not None:
        shape = [1] * q.ndim
        shape[qp.axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (q.astype(np.float64) - zp) * scale


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even, as onnxruntime's Cast),
    still as float32: the top 16 bits of each are its bfloat16. NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    out = rounded.view(np.float32).reshape(np.shape(x))
    return np.where(np.isnan(x), np.float32(np.nan), out).astype(np.float32)


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """The bfloat16 bit patterns (uint16) of float32 values already rounded to bfloat16."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


# The parameters of a bfloat16 weight in the table: its "integers" are the rounded values
# themselves (QuantizedWeight.dequantized() gives them back, which bias correction reads).
BFLOAT16_QPARAMS = QParams(np.array(1.0, dtype=np.float32), np.array(0.0, dtype=np.float32))


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A weight's parameters and its integers, in the initializer's layout."""

    qparams: QParams
    quantized: np.ndarray

    def dequantized(self) -> np.ndarray:
        return dequantize_array(self.quantized, self.qparams)


def weight_key(use, per_channel: bool) -> WeightKey:
    """The table key of a weight use (pyquant.graph.plan.WeightUse): per-channel scales
    follow the layer's output-channel axis."""
    per_channel = per_channel or use.always_per_channel
    return use.node.input[use.input_index], (use.channel_axis if per_channel else None)


@dataclasses.dataclass
class QuantTable:
    """Every quantization parameter of a model: activations by tensor name, weights by
    WeightKey. One table per run; techniques that decide integer weights replace entries.
    ``biases``: int8 biases with their own scale, by the layer's output name (a layer not
    listed has an int32 bias with scale = input scale x weight scale). ``notes``: why a
    technique changed a tensor's parameters, by tensor name (written into the model's
    metadata, read by the per-layer reports)."""

    activations: Dict[str, QParams]
    weights: Dict[WeightKey, QuantizedWeight]
    biases: Dict[str, QParams] = dataclasses.field(default_factory=dict)
    notes: Dict[str, List[str]] = dataclasses.field(default_factory=dict)

    def weight(self, use, per_channel: bool) -> QuantizedWeight:
        return self.weights[weight_key(use, per_channel)]
