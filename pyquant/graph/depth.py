"""How far each tensor is from the model's outputs, counted in weighted layers."""
from __future__ import annotations

import heapq
from typing import Dict

from onnx import ModelProto

from .view import GraphView

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
