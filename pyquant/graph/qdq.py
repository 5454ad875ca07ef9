"""Rewrite a float model into standard QDQ form (QuantizeLinear -> DequantizeLinear
pairs on activations, int8 weights and int32 biases behind DequantizeLinear).

bfloat16 (QuantType.BFloat16) takes the same places with Casts: Cast(to bfloat16) ->
Cast(to float) on activations, bfloat16 weights behind a Cast to float, biases float.
The outputs keep the QDQ names (``*_DequantizeLinear_Output``), so a tensor's
dequantized twin is found the same way whatever the type (dequantized_name)."""
from __future__ import annotations

import json
from typing import Dict, List, Tuple

import numpy as np
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from ..config import QuantConfig, QuantType
from ..qparams import (BFLOAT16_QPARAMS, QParams, QuantTable, bfloat16_bits, quantize_array, round_to_bfloat16,
                       weight_key)
from .plan import QuantPlan
from .view import GraphView, drop_unused_initializers

# int32 bias range: a bias that does not fit is saturated (and would need a larger
# weight or input scale; it does not happen with 8-bit scales on real CNNs).
_INT32_MIN, _INT32_MAX = -(2 ** 31), 2 ** 31 - 1
# Model metadata key of QuantTable.notes (JSON {tensor: [note, ...]}).
TENSOR_NOTES_KEY = "pyquant.tensor_notes"


class _Builder:
    def __init__(self, view: GraphView, bfloat16: bool) -> None:
        self.view = view
        self.bfloat16 = bfloat16  # Casts instead of Q/DQ, and no parameters
        self.initializers: List = []

    def const(self, name: str, array: np.ndarray) -> str:
        if self.bfloat16 and array.dtype == np.float32:  # a weight or constant rounded to bfloat16
            tensor = TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=array.shape,
                                 raw_data=bfloat16_bits(array).tobytes())
            self.initializers.append(tensor)
            return name
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def dq(self, quantized: str, qp: QParams, out: str) -> NodeProto:
        if self.bfloat16:
            return helper.make_node("Cast", [quantized], [out], name=out + "_Cast", to=TensorProto.FLOAT)
        kwargs = {"axis": qp.axis} if qp.axis is not None else {}
        return helper.make_node(
            "DequantizeLinear", [quantized, self.const(out + "_scale", qp.scale),
                                 self.const(out + "_zero_point", qp.zero_point)],
            [out], name=out + "_DequantizeLinear", **kwargs)

    def q(self, source: str, qp: QParams, out: str) -> NodeProto:
        if self.bfloat16:
            return helper.make_node("Cast", [source], [out], name=out + "_Cast", to=TensorProto.BFLOAT16)
        return helper.make_node(
            "QuantizeLinear", [source, self.const(out + "_scale", qp.scale),
                               self.const(out + "_zero_point", qp.zero_point)],
            [out], name=out + "_QuantizeLinear")


def dequantized_name(activation: str, graph_outputs) -> str:
    """The name under which consumers read ``activation`` after write_qdq."""
    return activation if activation in graph_outputs else f"{activation}_DequantizeLinear_Output"


def write_qdq(model: ModelProto, plan: QuantPlan, table: QuantTable, config: QuantConfig) -> ModelProto:
    """A new model: ``model`` with the QDQ pairs of ``plan`` and the parameters and integer
    weights of ``table`` (``model`` is not changed)."""
    act_qparams = table.activations
    out_model = ModelProto()
    out_model.CopyFrom(model)
    view = GraphView(out_model)
    b = _Builder(view, config.activation_type.is_float)
    # The plan refers to nodes of `model`; map them to the copy by position.
    copy_of = {id(o): c for o, c in zip(model.graph.node, out_model.graph.node)}

    head: List[NodeProto] = []  # DQ of weights, biases, constants and graph inputs
    after: Dict[str, List[NodeProto]] = {}  # producer output -> Q/DQ nodes placed right after it
    rename: Dict[str, str] = {}  # consumer input -> DQ output

    weight_qp: Dict[int, QParams] = {}  # id(node) -> its weight's parameters
    done_weights: Dict[Tuple[str, object], str] = {}
    for use in plan.weights:
        node = copy_of[id(use.node)]
        key = weight_key(use, config.per_channel)
        w_name, axis = key
        entry = table.weights[key]
        qp = entry.qparams
        if key not in done_weights:
            q_name = b.const(f"{w_name}_quantized", entry.quantized)
            head.append(b.dq(q_name, qp, f"{w_name}_DequantizeLinear_Output" + ("" if axis is None else "_pc")))
            done_weights[key] = head[-1].output[0]
        node.input[use.input_index] = done_weights[key]
        weight_qp[id(node)] = qp

    for use in plan.biases:
        node = copy_of[id(use.node)]
        act = act_qparams.get(use.activation)
        wqp = weight_qp.get(id(node))
        if act is None or wqp is None:
            continue
        b_name = node.input[use.input_index]
        bias = view.constant_value(b_name).astype(np.float64)
        qp = table.biases.get(node.output[0])
        if qp is not None:  # an int8 bias with its own scale (NPU)
            q = quantize_array(bias, qp, QuantType.QInt8)
        else:
            scale = (act.scale.astype(np.float64) * wqp.scale.astype(np.float64))
            scale = np.broadcast_to(scale, bias.shape) if wqp.axis is not None else scale
            q = np.clip(np.round(bias / scale), _INT32_MIN, _INT32_MAX).astype(np.int32)
            axis = 0 if wqp.axis is not None else None
            qp = QParams(np.asarray(scale, dtype=np.float32), np.zeros(np.shape(scale), dtype=np.int32), axis)
        out = f"{b_name}_{node.output[0]}_DequantizeLinear_Output"
        head.append(b.dq(b.const(f"{b_name}_{node.output[0]}_quantized", q), qp, out))
        node.input[use.input_index] = out

    graph_outputs = set(view.graph_outputs)
    constants = set(plan.constant_activations)
    for name in plan.activations:
        qp = BFLOAT16_QPARAMS if b.bfloat16 else act_qparams[name]
        if name in constants:
            value = view.constant_value(name)
            q_name = b.const(f"{name}_quantized", round_to_bfloat16(value) if b.bfloat16 else
                             quantize_array(value, qp, QuantType.of(qp.zero_point.dtype)))
            head.append(b.dq(q_name, qp, f"{name}_DequantizeLinear_Output"))
            rename[name] = head[-1].output[0]
            continue
        q_out = f"{name}_QuantizeLinear_Output"
        if name in graph_outputs:
            # Keep the graph output's name: the producer writes `<name>_float`, DQ writes `<name>`.
            source = f"{name}_float"
            view.producer[name].output[list(view.producer[name].output).index(name)] = source
            pair = [b.q(source, qp, q_out), b.dq(q_out, qp, name)]
        else:
            source = name
            pair = [b.q(name, qp, q_out), b.dq(q_out, qp, dequantized_name(name, graph_outputs))]
            rename[name] = pair[1].output[0]
        if name in view.producer:
            after.setdefault(source, []).extend(pair)
        else:  # a graph input
            head.extend(pair)

    new_nodes: List[NodeProto] = list(head)
    for node in out_model.graph.node:
        if view.node_name(node) not in plan.excluded:  # an excluded node reads the float tensors
            for i, inp in enumerate(node.input):
                if inp in rename:
                    node.input[i] = rename[inp]
        new_nodes.append(node)
        for o in node.output:
            new_nodes.extend(after.get(o, []))
    del out_model.graph.node[:]
    out_model.graph.node.extend(new_nodes)
    out_model.graph.initializer.extend(b.initializers)
    drop_unused_initializers(out_model)
    if table.notes:
        entry = out_model.metadata_props.add()
        entry.key, entry.value = TENSOR_NOTES_KEY, json.dumps(table.notes, sort_keys=True)
    return out_model


def tensor_notes(model: ModelProto) -> Dict[str, List[str]]:
    """The notes write_qdq stored in ``model`` (why a technique changed a tensor's scale)."""
    for entry in model.metadata_props:
        if entry.key == TENSOR_NOTES_KEY:
            return json.loads(entry.value)
    return {}


# Elementwise clamps: node(x) = clamp(x, lo, hi) with constant (possibly per-element) bounds.
_CLAMP_OPS = ("Relu", "Clip", "Min", "Max")
_LAYER_OPS = ("Conv", "Gemm", "MatMul")


def _is_constant_clamp(view: GraphView, node: NodeProto, source: str) -> bool:
    if node.op_type == "Relu":
        return True
    if node.op_type == "Clip":
        return node.input[0] == source and all(not b or view.is_constant(b) for b in node.input[1:])
    # Min/Max of the chain's tensor and one constant
    others = [i for i in node.input if i != source]
    return len(node.input) == 2 and len(others) == 1 and view.is_constant(others[0])


def _power_of_two_scale(view: GraphView, name: str) -> bool:
    """Whether ``name`` is the output of a QuantizeLinear/DequantizeLinear whose constant
    scales are all powers of two."""
    node = view.producer.get(name)
    if node is None or node.op_type not in ("QuantizeLinear", "DequantizeLinear") or \
            not view.is_constant(node.input[1]):
        return False
    scale = view.constant_value(node.input[1]).astype(np.float64)
    return bool(np.all((scale > 0) & (np.frexp(scale)[0] == 0.5)))


def with_requantized_layer_outputs(model: ModelProto) -> Tuple[ModelProto, int]:
    """For inference on onnxruntime's CPU only: a copy of a QDQ ``model`` where every
    Conv/Gemm/MatMul whose output reaches a QuantizeLinear through elementwise clamps only
    (Relu, Clip, Min/Max with a constant: e.g. ReLU6, or CLE's per-channel bounds) gets a
    Q/DQ pair with that QuantizeLinear's parameters right after it; returns (copy, pairs added).

    The outputs are the same: a clamp commutes with quantization on the same grid
    (Q(clamp(x)) = Q(clamp(DQ(Q(x)))): rounding is monotone, and a value already on the grid
    comes back to itself). But onnxruntime fuses DQ -> Conv -> Q into one integer
    convolution (QLinearConv) only when a QuantizeLinear follows the convolution; without
    the pair the layer runs as a float convolution between a Dequantize and a Quantize, in
    a layout that is about 2.4x slower than the float model on XINT8's power-of-two ReLU6
    nets (the clamp cannot be folded into a uint8 range that ends at 7.97).

    Only layers whose input, weight and output scales are powers of two get the pair: there
    the float convolution is exact (products and sums of dyadic values), so the integer one
    gives the same bits. With other scales onnxruntime's integer convolution rounds
    differently from its float one near ties (on INT8_CNN_ACCURATE's EfficientNet-Lite0, 6%
    of the layer inputs moved after the differences compounded through the network)."""
    out = ModelProto()
    out.CopyFrom(model)
    view = GraphView(out)
    added = 0
    new_nodes: List[NodeProto] = []
    inits: List[TensorProto] = []
    for node in out.graph.node:
        new_nodes.append(node)
        if node.op_type not in _LAYER_OPS or not node.output[0]:
            continue
        layer_out = node.output[0]
        first = view.single_consumer(layer_out)
        source, quantize = layer_out, first
        while quantize is not None and quantize.op_type in _CLAMP_OPS and _is_constant_clamp(view, quantize, source):
            source = quantize.output[0]
            quantize = view.single_consumer(source)
        if quantize is None or quantize.op_type != "QuantizeLinear" or source == layer_out:
            continue
        if len(quantize.input) < 3 or not all(view.is_constant(i) for i in quantize.input[1:3]) or \
                np.size(view.constant_value(quantize.input[1])) != 1:
            continue
        if not all(_power_of_two_scale(view, name) for name in (node.input[0], node.input[1], quantize.output[0])):
            continue
        q_name, dq_name = f"{layer_out}_requantized", f"{layer_out}_requantized_dequantized"
        # copies, not the QuantizeLinear's inputs: a Constant node producing those may come
        # after the layer, where the new pair is placed
        scale = view.constant_value(quantize.input[1]).astype(np.float32)
        zero_point = view.constant_value(quantize.input[2])
        inits += [numpy_helper.from_array(scale, q_name + "_scale"),
                  numpy_helper.from_array(zero_point, q_name + "_zero_point")]
        new_nodes += [helper.make_node("QuantizeLinear", [layer_out, q_name + "_scale", q_name + "_zero_point"],
                                       [q_name], name=q_name + "_QuantizeLinear"),
                      helper.make_node("DequantizeLinear", [q_name, q_name + "_scale", q_name + "_zero_point"],
                                       [dq_name], name=dq_name + "_DequantizeLinear")]
        first.input[list(first.input).index(layer_out)] = dq_name
        added += 1
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    out.graph.initializer.extend(inits)
    return out, added
