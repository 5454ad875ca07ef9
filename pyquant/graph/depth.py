"""How far each tensor is from the model's outputs and from its inputs, counted in
weighted layers."""
from __future__ import annotations

import heapq
from typing import Dict

from onnx import ModelProto

from .view import GraphView, outer_references

# The ops whose weights make a layer: each one on a path counts one step.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def layers_to_outputs(model: ModelProto) -> Dict[str, int]:
    """{tensor: the fewest weighted layers (WEIGHTED_OPS) on a path from it to a graph
    output}, for every tensor that reaches an output (main graph; a skip connection's
    path counts none of the layers it skips). A graph output is 0, the input of the last
    Conv before it 1."""
    view = GraphView(model)
    distance = {name: 0 for name in view.graph_outputs}
    heap = [(0, name) for name in view.graph_outputs]
    while heap:  # Dijkstra backwards from the outputs; steps cost 0 or 1
        steps, tensor = heapq.heappop(heap)
        node = view.producer.get(tensor)
        if steps > distance[tensor] or node is None:
            continue
        through = steps + (node.op_type in WEIGHTED_OPS)
        for name in node.input:
            if name and name not in view.initializers and through < distance.get(name, through + 1):
                distance[name] = through
                heapq.heappush(heap, (through, name))
    return distance


def layers_from_inputs(model: ModelProto) -> Dict[str, int]:
    """{tensor: the fewest weighted layers (WEIGHTED_OPS) on a path from a graph input to
    it}, for every tensor an input reaches (main graph; a subgraph body given as the model
    counts the tensors it reads from the enclosing graph as inputs). A graph input is 0,
    the first Conv's output 1; a tensor computed from constants alone is not listed."""
    view = GraphView(model)
    sources = set(view.graph_inputs) | (outer_references(model.graph) - set(view.initializers))
    distance = {name: 0 for name in sources}
    heap = [(0, name) for name in sources]
    while heap:  # Dijkstra forwards from the inputs; steps cost 0 or 1
        steps, tensor = heapq.heappop(heap)
        if steps > distance[tensor]:
            continue
        for node in view.consumers.get(tensor, ()):
            through = steps + (node.op_type in WEIGHTED_OPS)
            for name in node.output:
                if name and through < distance.get(name, through + 1):
                    distance[name] = through
                    heapq.heappush(heap, (through, name))
    return distance
