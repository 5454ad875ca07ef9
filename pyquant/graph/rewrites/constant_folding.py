"""Constant expressions that only move values, folded into initializers.

Exporters sometimes compute weights in the graph: PyTorch's LSTM export reorders the gates
of weight_ih, weight_hh and the biases with Slice, Concat and Unsqueeze on the constant
tensors (silero-vad). Such a computed tensor is not an initializer, so the quantizer saw
the LSTM's weights as activations: each Slice and Concat output got a uint8 per-tensor QDQ
pair (one scale for all four gates) before the LSTM's own int8 per-row weights. Folded,
they are weights again.

Only ops that select or rearrange values are folded (no arithmetic, and no output larger
than its inputs, so the model does not grow), evaluated by onnx's reference implementation:
the initializers hold exactly the values the graph computed.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from ..view import drop_unused_initializers

# Identity is not folded: graph preparation's If inlining carries each branch output
# through an Identity that folding the branches back relies on.
FOLDABLE_OPS = frozenset({"Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Gather",
                          "Flatten", "Split"})


def _evaluate(model: ModelProto, node: NodeProto, values: Dict[str, np.ndarray]) -> List[np.ndarray]:
    inputs = [i for i in node.input if i]
    graph = helper.make_graph([node], "fold", [],
                              [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
                               for o in node.output],
                              [numpy_helper.from_array(values[i], i) for i in dict.fromkeys(inputs)])
    single = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return [np.asarray(v) for v in ReferenceEvaluator(single).run(None, {})]


def fold_constant_data_movement(model: ModelProto) -> int:
    """Replace each main-graph node of FOLDABLE_OPS whose inputs are all initializers by
    initializers holding its outputs (repeatedly: a Concat of folded Slices folds too);
    returns the number of nodes folded."""
    graph = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    kept: List[NodeProto] = []
    folded = 0
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if (node.op_type not in FOLDABLE_OPS or node.domain not in ("", "ai.onnx") or not inputs
                or not all(i in values for i in inputs) or any(o in graph_outputs or o in values for o in node.output)):
            kept.append(node)
            continue
        try:
            outputs = _evaluate(model, node, values)
        except Exception:  # an op the reference cannot run here: left to onnxruntime
            kept.append(node)
            continue
        if sum(o.size for o in outputs) > sum(values[i].size for i in dict.fromkeys(inputs)):
            kept.append(node)  # a Gather that repeats rows: folding would grow the model
            continue
        for name, value in zip(node.output, outputs):
            if name:
                values[name] = value
                graph.initializer.append(numpy_helper.from_array(value, name))
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        drop_unused_initializers(model)
    return folded
