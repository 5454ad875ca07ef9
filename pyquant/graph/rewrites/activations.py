"""Written-out activations become one op: hard-swish and hard-sigmoid.

Exporters (paddle2onnx above all) write x * relu6(x + 3) / 6 as Add -> Clip -> Mul -> Div,
and hard-sigmoid as Add -> Clip -> Div or Mul -> Add -> Clip. Each of those steps would be
a quantization point under NPU rules (four roundings for one activation) and a scale
between a layer and its activation. As one op the quantizer treats them as one point:

    x * clip(x + 3, 0, 6) / 6   ->  HardSwish(x)            (opset >= 14)
                                    x * HardSigmoid(x)      (opset 13: no HardSwish)
    clip(x + 3, 0, 6) / 6       ->  HardSigmoid(x, 1/6, 1/2)
    clip(a x + b, 0, 1)         ->  HardSigmoid(x, a, b)

Exact in real arithmetic; the float32 results differ by rounding only (the preparation
stage checks it). SiLU (x * sigmoid(x)) and GELU already are one quantization point
without NPU rules (the elementwise ops between layers stay float) and are left as they are.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
from onnx import ModelProto, NodeProto, helper

from ..view import GraphView, drop_unused_initializers

_RTOL = 1e-6


def _scalar(view: GraphView, name: str) -> Optional[float]:
    if not name or not view.is_constant(name):
        return None
    value = view.constant_value(name)
    return float(value.reshape(())) if value is not None and value.size == 1 else None


def _is(value: Optional[float], target: float) -> bool:
    return value is not None and abs(value - target) <= _RTOL * max(1.0, abs(target))


def _binary_with_constant(view: GraphView, node: NodeProto, op_types: Tuple[str, ...]) -> Optional[Tuple[str, float]]:
    """(activation input, constant) of an Add/Mul/Div/Sub with one scalar constant."""
    if node is None or node.op_type not in op_types or len(node.input) != 2:
        return None
    a, b = node.input
    if _scalar(view, b) is not None and _scalar(view, a) is None:
        return a, _scalar(view, b)
    if node.op_type in ("Add", "Mul") and _scalar(view, a) is not None and _scalar(view, b) is None:
        return b, _scalar(view, a)
    return None


def _clip_bounds(view: GraphView, node: Optional[NodeProto]) -> Optional[Tuple[float, float]]:
    if node is None or node.op_type != "Clip" or len(node.input) < 3:
        return None
    low, high = _scalar(view, node.input[1]), _scalar(view, node.input[2])
    return None if low is None or high is None else (low, high)


def _only_reader(view: GraphView, name: str) -> Optional[NodeProto]:
    return view.single_consumer(name)


def _divided_by_six(view: GraphView, node: Optional[NodeProto]) -> Optional[str]:
    """If ``node`` is y / 6 or y * (1/6): the tensor y."""
    found = _binary_with_constant(view, node, ("Div", "Mul"))
    if found is None:
        return None
    x, c = found
    return x if (node.op_type == "Div" and _is(c, 6.0)) or (node.op_type == "Mul" and _is(c, 1 / 6)) else None


def _hard_sigmoid_from(view: GraphView, add: NodeProto) -> Optional[Tuple[str, List[NodeProto], float, float, str]]:
    """Add(x, 3) -> Clip(0, 6) -> /6, or [Mul(x, a) ->] Add(., b) -> Clip(0, 1):
    (x, nodes, alpha, beta, output)."""
    found = _binary_with_constant(view, add, ("Add",))
    if found is None:
        return None
    inner, offset = found
    clip = _only_reader(view, add.output[0])
    bounds = _clip_bounds(view, clip)
    if bounds is None:
        return None
    if _is(offset, 3.0) and _is(bounds[0], 0.0) and _is(bounds[1], 6.0):
        scale = _only_reader(view, clip.output[0])
        if _divided_by_six(view, scale) == clip.output[0]:
            return inner, [add, clip, scale], 1 / 6, 0.5, scale.output[0]
        return None
    if _is(bounds[0], 0.0) and _is(bounds[1], 1.0):
        producer = view.producer.get(inner)
        scaled = _binary_with_constant(view, producer, ("Mul",))
        if scaled is not None and view.single_consumer(inner) is add:
            return scaled[0], [producer, add, clip], scaled[1], offset, clip.output[0]
        return inner, [add, clip], 1.0, offset, clip.output[0]
    return None


def _hard_swish_from(view: GraphView, add: NodeProto) -> Optional[Tuple[str, List[NodeProto], str]]:
    """x * clip(x + 3, 0, 6) / 6 in its written-out orders: (x, nodes, output)."""
    found = _binary_with_constant(view, add, ("Add",))
    if found is None or not _is(found[1], 3.0):
        return None
    x = found[0]
    clip = _only_reader(view, add.output[0])
    bounds = _clip_bounds(view, clip)
    if bounds is None or not (_is(bounds[0], 0.0) and _is(bounds[1], 6.0)):
        return None
    after = _only_reader(view, clip.output[0])
    if after is None:
        return None
    if after.op_type == "Mul" and set(after.input) == {x, clip.output[0]}:  # (x * clip) / 6
        last = _only_reader(view, after.output[0])
        if _divided_by_six(view, last) == after.output[0]:
            return x, [add, clip, after, last], last.output[0]
    if _divided_by_six(view, after) == clip.output[0]:  # x * (clip / 6)
        mul = _only_reader(view, after.output[0])
        if mul is not None and mul.op_type == "Mul" and set(mul.input) == {x, after.output[0]}:
            return x, [add, clip, after, mul], mul.output[0]
    return None


def _opset(model: ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _replace(model: ModelProto, old: List[NodeProto], new: List[NodeProto]) -> None:
    index = min(list(model.graph.node).index(n) for n in old)
    for n in old:
        model.graph.node.remove(n)
    for offset, n in enumerate(new):
        model.graph.node.insert(index + offset, n)


def fuse_activations(model: ModelProto) -> int:
    """Rewrite written-out hard-swish and hard-sigmoid as single ops, in place."""
    view = GraphView(model)
    fused = 0
    for node in list(model.graph.node):
        if node.op_type != "Add" or node not in model.graph.node:
            continue
        swish = _hard_swish_from(view, node)
        if swish is not None:
            x, nodes, out = swish
            name = f"{out}_hardswish"
            if _opset(model) >= 14:
                new = [helper.make_node("HardSwish", [x], [out], name=name)]
            else:
                new = [helper.make_node("HardSigmoid", [x], [f"{out}_gate"], name=f"{name}_gate", alpha=1 / 6, beta=0.5),
                       helper.make_node("Mul", [x, f"{out}_gate"], [out], name=name)]
            _replace(model, nodes, new)
            view.refresh()
            fused += 1
            continue
        sigmoid = _hard_sigmoid_from(view, node)
        if sigmoid is not None:
            x, nodes, alpha, beta, out = sigmoid
            _replace(model, nodes, [helper.make_node("HardSigmoid", [x], [out], name=f"{out}_hardsigmoid",
                                                     alpha=float(np.float32(alpha)), beta=float(np.float32(beta)))])
            view.refresh()
            fused += 1
    if fused:
        drop_unused_initializers(model)
    return fused
