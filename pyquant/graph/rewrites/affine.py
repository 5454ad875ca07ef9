"""Fold constant affines (Mul/Div/Add/Sub by a scalar or per-channel constant) into the
neighbouring Conv/Gemm/MatMul.

Reparameterised blocks (MobileOne, RepVGG exported without fusing), scale layers and
input normalisation leave y = layer(x) * a + b, or layer(x * a + b), in the graph. Each
such op would be one more quantization point, and its scale would sit between a layer and
its activation. Folded, the layer computes the same function with W' and b':

  after the layer (per output channel o):  W'[o] = W[o] a[o], b'[o] = b[o] a[o] (Mul/Div)
                                            b'[o] = b[o] + c[o]               (Add/Sub)
  before the layer (per input channel i):  W'[., i] = W[., i] a[i]            (Mul/Div)
                                            b' = b + sum_i,k W[., i, k] c[i]  (Add/Sub: only
                                            without zero padding, whose zeros would not be
                                            shifted by c)

Div by d folds as Mul by 1/d and Sub by c as Add of -c: exact up to float rounding.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from onnx import ModelProto, NodeProto

from ..view import GraphView, attribute, drop_unused_initializers

_AFFINE = ("Mul", "Div", "Add", "Sub")
_LAYERS = ("Conv", "Gemm", "MatMul")


def _constant_operand(view: GraphView, node: NodeProto) -> Optional[Tuple[str, np.ndarray]]:
    """(activation input, constant) of an affine node, in an order that folds: for Sub
    and Div the constant must be the second operand."""
    if node.op_type not in _AFFINE or len(node.input) != 2:
        return None
    a, b = node.input
    if view.is_constant(b) and not view.is_constant(a):
        return a, view.constant_value(b)
    if view.is_constant(a) and not view.is_constant(b) and node.op_type in ("Mul", "Add"):
        return b, view.constant_value(a)
    return None


def _as_scale_and_shift(op_type: str, c: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    c = c.astype(np.float64)
    if op_type == "Mul":
        return c, np.zeros_like(c)
    if op_type == "Div":
        return (None if np.any(c == 0) else 1.0 / c), np.zeros_like(c)
    return np.ones_like(c), (c if op_type == "Add" else -c)


def _per_channel(c: np.ndarray, channels: int, axis_from_end: int, max_rank: int) -> Optional[np.ndarray]:
    """``c`` as a vector over a channel axis (counted from the end of the broadcast
    shape), or None if it varies along any other axis or would raise the output's rank."""
    if c.ndim > max_rank:
        return None
    if c.size == 1:
        return np.full(channels, float(c.reshape(())))
    shape = (1,) * max(0, axis_from_end - c.ndim) + c.shape
    position = len(shape) - axis_from_end
    if shape[position] != channels or any(d != 1 for i, d in enumerate(shape) if i != position):
        return None
    return c.reshape(channels)


def _channel_affine(op_type: str, c: np.ndarray, channels: int, axis_from_end: int, max_rank: int
                    ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The op as (scale, shift) vectors over ``channels``, or None when it does not fold
    (a division by zero, or a constant that varies along another axis)."""
    scale, shift = _as_scale_and_shift(op_type, c)
    if scale is None:
        return None
    scale = _per_channel(scale, channels, axis_from_end, max_rank)
    shift = _per_channel(shift, channels, axis_from_end, max_rank)
    return None if scale is None or shift is None else (scale, shift)


def _layer_geometry(view: GraphView, layer: NodeProto) -> Optional[dict]:
    """Weight, bias and axes of a foldable layer (constant weight, plain attributes)."""
    if layer.op_type not in _LAYERS or len(layer.input) < 2 or not view.is_constant(layer.input[1]):
        return None
    w = view.constant_value(layer.input[1])
    if w is None or w.dtype != np.float32:
        return None
    has_bias = len(layer.input) > 2 and bool(layer.input[2])
    if layer.op_type == "Conv":
        if w.ndim < 3:
            return None
        group = int(attribute(layer, "group", 1))
        # output rank = weight rank; the channel is the second axis of [N, C, ...]
        return dict(w=w, bias_ok=True, has_bias=has_bias, out_axis=0, out_from_end=w.ndim - 1, max_rank=w.ndim,
                    in_from_end=w.ndim - 1, group=group, pads=any(attribute(layer, "pads", []) or [])
                    or _str(attribute(layer, "auto_pad", "NOTSET")) in ("SAME_UPPER", "SAME_LOWER"))
    if layer.op_type == "Gemm":
        if attribute(layer, "transA", 0) or w.ndim != 2:
            return None
        plain = attribute(layer, "alpha", 1.0) == 1.0 and attribute(layer, "beta", 1.0) == 1.0
        trans_b = bool(attribute(layer, "transB", 0))
        return dict(w=w, bias_ok=plain, has_bias=has_bias, out_axis=0 if trans_b else 1, out_from_end=1, max_rank=2,
                    in_from_end=1, in_axis=1 if trans_b else 0, group=1, pads=False)
    if w.ndim != 2 or layer.input[1] != layer.input[-1]:
        return None
    return dict(w=w, bias_ok=False, has_bias=False, out_axis=1, out_from_end=1, max_rank=2, in_from_end=1, in_axis=0,
                group=1, pads=False)


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bias(view: GraphView, layer: NodeProto, channels: int) -> np.ndarray:
    if len(layer.input) > 2 and layer.input[2]:
        return view.constant_value(layer.input[2]).astype(np.float64).reshape(channels)
    return np.zeros(channels)


def _write(view: GraphView, layer: NodeProto, w: np.ndarray, bias: Optional[np.ndarray]) -> None:
    w_name = f"{layer.input[1]}_affine_{layer.output[0]}"
    view.replace_initializer(w_name, w.astype(np.float32))
    layer.input[1] = w_name
    if bias is not None:
        b_name = f"{layer.output[0]}_bias_affine"
        view.replace_initializer(b_name, bias.astype(np.float32))
        while len(layer.input) < 3:
            layer.input.append("")
        layer.input[2] = b_name


def _out_channels(geo: dict) -> int:
    return geo["w"].shape[geo["out_axis"]]


def _fold_after(view: GraphView, layer: NodeProto, op: NodeProto, c: np.ndarray) -> bool:
    geo = _layer_geometry(view, layer)
    if geo is None:
        return False
    channels = _out_channels(geo)
    affine = _channel_affine(op.op_type, c, channels, geo["out_from_end"], geo["max_rank"])
    if affine is None:
        return False
    scale, shift = affine
    if np.any(shift != 0) and not geo["bias_ok"]:
        return False
    w = geo["w"].astype(np.float64)
    shape = [1] * w.ndim
    shape[geo["out_axis"]] = channels
    w = w * scale.reshape(shape)
    bias = None
    if geo["has_bias"] or np.any(shift != 0):
        bias = _bias(view, layer, channels) * scale + shift
    _write(view, layer, w, bias)
    layer.output[0] = op.output[0]
    return True


def _fold_before(view: GraphView, op: NodeProto, layer: NodeProto, c: np.ndarray) -> bool:
    geo = _layer_geometry(view, layer)
    if geo is None or layer.input[0] != op.output[0]:
        return False
    w = geo["w"].astype(np.float64)
    if layer.op_type == "Conv":
        group, out_c, per_group = geo["group"], w.shape[0], w.shape[1]
        in_channels = per_group * group
    else:
        in_channels = w.shape[geo["in_axis"]]
    affine = _channel_affine(op.op_type, c, in_channels, geo["in_from_end"], geo["max_rank"])
    if affine is None:
        return False
    scale, shift = affine
    has_shift = bool(np.any(shift != 0))
    if has_shift and (not geo["bias_ok"] or geo["pads"]):
        return False
    if layer.op_type == "Conv":
        # weight [O, C/g, k...]: output o of group o // (O/g) reads input channels of that group
        per_weight = scale.reshape(group, per_group)[np.arange(out_c) // (out_c // group)]
        shift_w = shift.reshape(group, per_group)[np.arange(out_c) // (out_c // group)]
        spatial = (1,) * (w.ndim - 2)
        new_w = w * per_weight.reshape(out_c, per_group, *spatial)
        moved = (w * shift_w.reshape(out_c, per_group, *spatial)).reshape(out_c, -1).sum(axis=1)
        channels = out_c
    else:
        shape = [1, 1]
        shape[geo["in_axis"]] = in_channels
        new_w = w * scale.reshape(shape)
        moved = (w * shift.reshape(shape)).sum(axis=geo["in_axis"])
        channels = _out_channels(geo)
    bias = None
    if geo["has_bias"] or has_shift:
        bias = _bias(view, layer, channels) + moved
    _write(view, layer, new_w, bias)
    layer.input[0] = _constant_operand(view, op)[0]
    return True


def fold_affines(model: ModelProto) -> int:
    """Fold every foldable constant affine into its layer, in place; returns the count."""
    view = GraphView(model)
    folded = 0
    changed = True
    while changed:
        changed = False
        for op in list(model.graph.node):
            found = _constant_operand(view, op)
            if found is None:
                continue
            x, c = found
            if c is None or c.dtype.kind != "f":
                continue
            producer = view.producer.get(x)
            done = False
            if producer is not None and producer.op_type in _LAYERS and view.single_consumer(x) is op:
                done = _fold_after(view, producer, op, c)
            if not done:
                consumer = view.single_consumer(op.output[0])
                if consumer is not None and consumer.op_type in _LAYERS:
                    done = _fold_before(view, op, consumer, c)
            if done:
                model.graph.node.remove(op)
                view.refresh()
                folded += 1
                changed = True
    if folded:
        drop_unused_initializers(model)
    return folded
