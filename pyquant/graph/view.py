"""GraphView: the one place that indexes an ONNX graph (producers, consumers,
initializers, element types). Everything that walks the graph goes through it."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, numpy_helper


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
        return node.name or f"{node.op_type}({node.output[0]})"

    def replace_initializer(self, name: str, array: np.ndarray) -> None:
        new = numpy_helper.from_array(array, name)
        for i, t in enumerate(self.graph.initializer):
            if t.name == name:
                self.graph.initializer[i].CopyFrom(new)
                break
        else:
            self.graph.initializer.append(new)
        self.initializers[name] = new


def attribute(node: NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default
