"""How far each tensor is from the model's outputs and from its inputs, counted in
weighted layers."""
from __future__ import annotations

import collections
import heapq
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

from onnx import ModelProto, NodeProto

from .view import GraphView, node_reads, subgraphs

# The ops whose weights make a layer: each one on a path counts one step.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _steps(node: NodeProto) -> int:
    """Weighted layers a path through ``node`` crosses: one for a weighted op, and one for
    a control-flow node whose bodies hold one (the body's own depth is not counted)."""
    if node.op_type in WEIGHTED_OPS:
        return 1
    return int(any(_steps(n) for g in subgraphs(node) for n in g.node))


def _costs(model: ModelProto) -> Dict[Tuple[str, ...], int]:
    """_steps of every main-graph node, keyed by its outputs (bodies are walked once)."""
    return {tuple(node.output): _steps(node) for node in model.graph.node}


def _fewest_steps(sources: Iterable[str], neighbours: Callable[[str], Iterable[Tuple[str, int]]]) -> Dict[str, int]:
    """Dijkstra from ``sources`` (0 each) over edges of cost 0 or 1."""
    distance = {name: 0 for name in sources}
    heap = [(0, name) for name in distance]
    while heap:
        steps, tensor = heapq.heappop(heap)
        if steps > distance[tensor]:
            continue
        for name, cost in neighbours(tensor):
            if steps + cost < distance.get(name, steps + cost + 1):
                distance[name] = steps + cost
                heapq.heappush(heap, (steps + cost, name))
    return distance


def layers_to_outputs(model: ModelProto) -> Dict[str, int]:
    """{tensor: the fewest weighted layers (WEIGHTED_OPS) on a path from it to a graph
    output}, for every tensor that reaches an output (main graph; a skip connection's
    path counts none of the layers it skips; a control-flow node leads from what it and
    its bodies read to its outputs). A graph output is 0, the input of the last Conv
    before it 1."""
    view, costs = GraphView(model), _costs(model)

    def backwards(tensor: str) -> Iterator[Tuple[str, int]]:
        node = view.producer.get(tensor)
        if node is not None:
            cost = costs[tuple(node.output)]
            yield from ((name, cost) for name in node_reads(node) if name not in view.initializers)
    return _fewest_steps(view.graph_outputs, backwards)


def layers_from_inputs(model: ModelProto) -> Dict[str, int]:
    """{tensor: the fewest weighted layers (WEIGHTED_OPS) on a path from a graph input to
    it}, for every tensor an input reaches (main graph, control flow as in
    layers_to_outputs). A graph input is 0, the first Conv's output 1; a tensor computed
    from constants alone is not listed."""
    view, costs = GraphView(model), _costs(model)
    readers: Dict[str, List[NodeProto]] = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node_reads(node):
            readers[name].append(node)

    def forwards(tensor: str) -> Iterator[Tuple[str, int]]:
        for node in readers.get(tensor, ()):
            cost = costs[tuple(node.output)]
            yield from ((name, cost) for name in node.output if name)
    return _fewest_steps(view.graph_inputs, forwards)
