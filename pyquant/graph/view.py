"""GraphView: the one place that indexes an ONNX graph (producers, consumers,
initializers, element types). Everything that walks the graph goes through it."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Dict, List, Optional, Set

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, numpy_helper

from ..errors import ModelError


class GraphView:
    def __init__(self, model: ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the indexes after the graph was edited."""
        g = self.graph
        self.initializers: Dict[str, TensorProto] = {t.name: t for t in g.initializer}
        self.producer: Dict[str, NodeProto] = {}
        self.consumers: Dict[str, List[NodeProto]] = defaultdict(list)
        for node in g.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.graph_inputs = [i.name for i in g.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in g.output]
        self.elem_type: Dict[str, int] = {}
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            if vi.type.HasField("tensor_type"):
                self.elem_type[vi.name] = vi.type.tensor_type.elem_type
        for name, t in self.initializers.items():
            self.elem_type[name] = t.data_type
        for node in g.node:  # Constant nodes behave like initializers
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        self.elem_type[node.output[0]] = a.t.data_type

    def is_float(self, name: str) -> bool:
        return self.elem_type.get(name) == TensorProto.FLOAT

    def is_constant(self, name: str) -> bool:
        if name in self.initializers:
            return True
        p = self.producer.get(name)
        return p is not None and p.op_type == "Constant"

    def constant_value(self, name: str) -> Optional[np.ndarray]:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant":
            for a in p.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def single_consumer(self, name: str) -> Optional[NodeProto]:
        users = self.consumers.get(name, [])
        if len(users) == 1 and name not in self.graph_outputs:
            return users[0]
        return None

    def node_name(self, node: NodeProto) -> str:
        return node_name(node)

    def replace_initializer(self, name: str, array: np.ndarray) -> None:
        new = numpy_helper.from_array(array, name)
        for i, t in enumerate(self.graph.initializer):
            if t.name == name:
                self.graph.initializer[i].CopyFrom(new)
                break
        else:
            self.graph.initializer.append(new)
        self.initializers[name] = new


@dataclasses.dataclass(frozen=True)
class ImageInput:
    name: str
    layout: str  # "NCHW" or "NHWC"
    size: Optional[int]  # static height (= width), None if dynamic


def image_input(model: ModelProto) -> ImageInput:
    """The single image input of a model: name, layout (NHWC if the last axis is 3 and the
    second is not), static size. ModelError if there is not exactly one rank-4 input."""
    view = GraphView(model)
    if len(view.graph_inputs) != 1:
        raise ModelError(f"image data needs a model with one input, this one has {view.graph_inputs}")
    name = view.graph_inputs[0]
    spec = next(i for i in model.graph.input if i.name == name)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in spec.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ModelError(f"input {name!r} has rank {len(dims)}; image data needs [N, C, H, W] or [N, H, W, C]")
    layout = "NHWC" if dims[3] == 3 and dims[1] != 3 else "NCHW"
    return ImageInput(name, layout, dims[2] if layout == "NCHW" else dims[1])


def node_name(node: NodeProto) -> str:
    """A node's name in messages and reports: its own, or ``OpType(first output)``."""
    return node.name or f"{node.op_type}({node.output[0]})"


def subgraphs(node: NodeProto) -> List[onnx.GraphProto]:
    """The bodies of a control-flow node (If branches, Loop and Scan bodies)."""
    out: List[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def outer_references(graph: onnx.GraphProto) -> Set[str]:
    """Names a subgraph (and the subgraphs in it) reads from enclosing scopes."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {o for n in graph.node for o in n.output if o}
    used: Set[str] = set()
    for n in graph.node:
        used |= {i for i in n.input if i}
        for g in subgraphs(n):
            used |= outer_references(g)
    return used - defined


def node_reads(node: NodeProto) -> Set[str]:
    """Every tensor a node reads: its inputs and, for control flow, what its bodies read
    from the enclosing graph."""
    reads = {i for i in node.input if i}
    for g in subgraphs(node):
        reads |= outer_references(g)
    return reads


def drop_unused_initializers(model: ModelProto) -> None:
    """Remove initializers no node reads, in its inputs or its bodies (and, for old models
    that list initializers as graph inputs, those inputs too)."""
    used = {i for n in model.graph.node for i in node_reads(n)} | {o.name for o in model.graph.output}
    before = {t.name for t in model.graph.initializer}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    inputs = [i for i in model.graph.input if i.name not in before or i.name in used]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def attribute(node: NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def truncated(model: ModelProto, outputs: List[str]) -> ModelProto:
    """A copy of ``model`` that computes only ``outputs`` (graph outputs of the copy): the
    nodes they depend on, the initializers those nodes read. Graph inputs are kept."""
    view = GraphView(model)
    needed, stack = set(), list(outputs)
    while stack:
        name = stack.pop()
        node = view.producer.get(name)
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(i for i in node.input if i)
    out = ModelProto()
    out.CopyFrom(model)
    keep = [n for n, original in zip(out.graph.node, model.graph.node) if id(original) in needed]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    del out.graph.output[:]
    out.graph.output.extend(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs)
    drop_unused_initializers(out)
    return out
