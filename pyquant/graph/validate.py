"""Checks on a model's structure: each tensor name is defined once and each node input is
defined (every stage of the pipeline must leave this true; tests run it after each), and
a model to quantize is not quantized already, in any of the formats."""
from __future__ import annotations

from collections import Counter

from onnx import ModelProto

from ..errors import ModelError


def check_definitions(model: ModelProto) -> None:
    """ModelError naming the tensors defined more than once (by graph inputs, initializers
    and node outputs of the main graph) or read without a definition."""
    g = model.graph
    initializers = [t.name for t in g.initializer]
    inputs = [i.name for i in g.input if i.name not in set(initializers)]  # old models list initializers as inputs
    outputs = [o for n in g.node for o in n.output if o]
    counts = Counter(initializers + inputs + outputs)
    twice = sorted(name for name, c in counts.items() if c > 1)
    if twice:
        raise ModelError(f"{len(twice)} tensor(s) defined more than once: {', '.join(twice[:5])}"
                         + (" ..." if len(twice) > 5 else ""))
    defined = set(counts)
    missing = sorted({i for n in g.node for i in n.input if i and i not in defined})
    if missing:
        raise ModelError(f"{len(missing)} tensor(s) read but never defined: {', '.join(missing[:5])}")


# Integer-operator and QOperator formats (onnxruntime's quantizers write these), besides QDQ.
_QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
                  "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QAttention", "DynamicQuantizeLSTM",
                  "QuantizeBFP", "DequantizeBFP"}


def check_not_quantized(model: ModelProto) -> None:
    """ModelError naming the first node that shows ``model`` is already quantized."""
    for node in model.graph.node:
        if node.op_type in _QUANTIZED_OPS or node.op_type.startswith("QLinear"):
            raise ModelError(f"node {node.name or node.output[0]!r} is a {node.op_type}: the model is already "
                             "quantized; pass the float model")
