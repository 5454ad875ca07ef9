"""Layers of a QDQ model and variants of it with some layers reading float inputs.

A *layer* here is one node of the float model together with every quantized value it
reads in the QDQ model: its activation inputs (each behind a QuantizeLinear ->
DequantizeLinear pair), its int8 weight and its int32 bias (behind DequantizeLinear).
A Conv is one layer (input, weight, bias); an Add of two activations is one layer (both
inputs); a MaxPool that reads a quantized tensor is a layer too (its input). A model
output with a QDQ pair of its own (quantize_region_outputs) is a layer of its own, named
``output <tensor>``: the rounding an NPU applies when it hands the result over.

Where the rounding of a tensor enters the error is where a layer reads it, so "leave
this layer in float" means: this node reads the float values (the tensor the
QuantizeLinear rounds, the float weight and bias), every other reader of the same
tensor still reads the rounded ones. Variants are made by rewiring the node's inputs in
a copy of the QDQ model (exact, and cheap: no new calibration), never by quantizing again.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Tuple

from onnx import ModelProto, NodeProto, TensorProto, helper

from ..errors import ModelError
from .view import GraphView, drop_unused_initializers

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclasses.dataclass(frozen=True)
class RoundedInput:
    """One quantized value a layer reads: input ``index`` of its node reads ``dequantized``
    in the QDQ model; ``float_name`` is what it reads in the float model."""

    index: int
    dequantized: str
    float_name: str
    kind: str  # "activation" (a QDQ pair), "weight" or "bias" (an integer initializer behind DequantizeLinear)


@dataclasses.dataclass(frozen=True)
class Layer:
    """A node of the float model (``position`` in its node list) and the quantized values
    it reads; or, with ``output`` set, the QDQ pair on a model output."""

    name: str
    op_type: str
    position: int
    outputs: Tuple[str, ...]
    inputs: Tuple[RoundedInput, ...] = ()
    output: str = ""  # a model output whose own QDQ pair this layer is

    @property
    def activations(self) -> List[str]:
        """The float activation tensors whose rounding this layer reads."""
        if self.output:
            return [self.output]
        return [i.float_name for i in self.inputs if i.kind == "activation"]

    @property
    def weights(self) -> List[str]:
        return [i.float_name for i in self.inputs if i.kind == "weight"]


class QdqLayers:
    """The layers of ``qdq`` (written by pyquant.graph.qdq.write_qdq from ``float_model``)
    and variants of ``qdq`` in which chosen layers read float values."""

    def __init__(self, qdq: ModelProto, float_model: ModelProto) -> None:
        self.qdq, self.float_model = qdq, float_model
        self.view = GraphView(qdq)
        self.float_view = GraphView(float_model)
        compute = [n for n in qdq.graph.node if n.op_type not in QDQ_OPS]
        if len(compute) != len(float_model.graph.node):
            raise ModelError(f"the QDQ model has {len(compute)} nodes besides its QuantizeLinear/DequantizeLinear, "
                             f"the float model {len(float_model.graph.node)}: not written from this float model")
        self.layers: List[Layer] = []
        for position, (node, twin) in enumerate(zip(compute, float_model.graph.node)):
            if node.op_type != twin.op_type:
                raise ModelError(f"node {position} is {node.op_type} in the QDQ model and {twin.op_type} in the float "
                                 "model: not written from this float model")
            # an input the float node lacks: a bias the PARAMETERS techniques added (bias
            # correction of a bias-less layer); its float value is no bias at all
            rounded = tuple(self._rounded(i, name, twin.input[i] if i < len(twin.input) else "")
                            for i, name in enumerate(node.input) if self._is_dequantized(name))
            if rounded:
                self.layers.append(Layer(self.float_view.node_name(twin), twin.op_type, position,
                                         tuple(twin.output), rounded))
        for out in self.view.graph_outputs:
            dq = self.view.producer.get(out)
            if dq is not None and dq.op_type == "DequantizeLinear" and self._quantize_of(dq) is not None:
                producer = self.float_view.producer.get(out)
                position = list(float_model.graph.node).index(producer) if producer is not None else -1
                self.layers.append(Layer(f"output {out}", "output", position, (out,), output=out))

    def _is_dequantized(self, name: str) -> bool:
        producer = self.view.producer.get(name)
        return producer is not None and producer.op_type == "DequantizeLinear"

    def _quantize_of(self, dq: NodeProto):
        q = self.view.producer.get(dq.input[0])
        return q if q is not None and q.op_type == "QuantizeLinear" else None

    def _rounded(self, index: int, dequantized: str, float_name: str) -> RoundedInput:
        q = self._quantize_of(self.view.producer[dequantized])
        if q is not None:  # an activation: its float value is what the QuantizeLinear reads
            return RoundedInput(index, dequantized, q.input[0], "activation")
        integers = self.view.producer[dequantized].input[0]
        kind = "bias" if self.view.elem_type.get(integers) == TensorProto.INT32 else "weight"
        return RoundedInput(index, dequantized, float_name, kind)

    def quantization_params(self, activation: str):
        """(scale, zero point) arrays of the QuantizeLinear that rounds ``activation``, or None."""
        for node in self.view.consumers.get(activation, []):
            if node.op_type == "QuantizeLinear":
                return self.view.constant_value(node.input[1]), self.view.constant_value(node.input[2])
        return None

    def with_float(self, layers: Iterable[Layer]) -> ModelProto:
        """A copy of the QDQ model in which each of ``layers`` reads float values (its node's
        rounded inputs rewired to the float tensors; a model output's pair replaced by an
        Identity); Q/DQ nodes nobody reads any more are removed."""
        model = ModelProto()
        model.CopyFrom(self.qdq)
        compute = [n for n in model.graph.node if n.op_type not in QDQ_OPS]
        present = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input} \
            | {t.name for t in model.graph.initializer}
        head: List[NodeProto] = []
        replaced_outputs: Dict[str, str] = {}
        for layer in layers:
            if layer.output:
                dq = self.view.producer[layer.output]
                replaced_outputs[dq.output[0]] = self._quantize_of(dq).input[0]
                continue
            node = compute[layer.position]
            for rounded in layer.inputs:
                node.input[rounded.index] = rounded.float_name
                if rounded.float_name and rounded.float_name not in present:
                    head.extend(self._float_constant(model, rounded.float_name))
                    present.add(rounded.float_name)
        for node in compute:  # optional inputs left empty at the end are dropped
            while node.input and not node.input[-1]:
                del node.input[-1]
        nodes = head + [n for n in model.graph.node]
        for i, node in enumerate(nodes):
            if node.op_type == "DequantizeLinear" and node.output[0] in replaced_outputs:
                nodes[i] = helper.make_node("Identity", [replaced_outputs[node.output[0]]], [node.output[0]],
                                            name=node.name + "_float")
        del model.graph.node[:]
        model.graph.node.extend(_without_unread_qdq(nodes, [o.name for o in model.graph.output]))
        drop_unused_initializers(model)
        return model

    def _float_constant(self, model: ModelProto, name: str) -> List[NodeProto]:
        """Puts the float model's constant ``name`` into ``model``: its initializer, or the
        Constant node that makes it (returned, to be placed first)."""
        if name in self.float_view.initializers:
            model.graph.initializer.append(self.float_view.initializers[name])
            return []
        producer = self.float_view.producer.get(name)
        if producer is not None and producer.op_type == "Constant":
            return [producer]
        raise ModelError(f"the float model has no constant {name!r} for the float variant of its layer")

    def float_everywhere(self) -> ModelProto:
        return self.with_float(self.layers)

    def only_quantized(self, keep: Layer) -> ModelProto:
        """Every layer but ``keep`` reads float values."""
        return self.with_float(layer for layer in self.layers if layer is not keep)


def _without_unread_qdq(nodes: List[NodeProto], graph_outputs: List[str]) -> List[NodeProto]:
    """``nodes`` less the QuantizeLinear/DequantizeLinear whose outputs nothing reads."""
    needed = set(graph_outputs)
    kept: List[NodeProto] = []
    for node in reversed(nodes):
        if node.op_type in QDQ_OPS and not any(o in needed for o in node.output):
            continue
        kept.append(node)
        needed.update(i for i in node.input if i)
    return kept[::-1]

