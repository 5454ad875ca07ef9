"""Constant nodes become initializers.

Exporters (paddle2onnx, older PyTorch) often hold weights and biases in Constant nodes.
Every later step reads weights as initializers, and a transform that writes a rescaled
weight under the Constant's output name would otherwise define that name twice (the
cause of a CLE failure on a paddle2onnx text detector)."""
from __future__ import annotations

import numpy as np
from onnx import ModelProto, numpy_helper

from ...errors import ModelError
from ..view import attribute

# Constant attributes that hold a dense value (sparse_value and string values are left alone).
_SCALAR_KINDS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                 "value_ints": np.int64}


def constant_value(node) -> "np.ndarray | None":
    """The value of a Constant node, or None for forms not turned into initializers."""
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in _SCALAR_KINDS:
            return np.asarray(attribute(node, a.name), dtype=_SCALAR_KINDS[a.name])
    return None


def constants_to_initializers(model: ModelProto) -> int:
    """Replace each Constant node of the main graph by an initializer of the same name."""
    existing = {t.name for t in model.graph.initializer}
    kept, moved = [], 0
    for node in model.graph.node:
        value = constant_value(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if value is None:
            kept.append(node)
            continue
        name = node.output[0]
        if name in existing:
            raise ModelError(f"tensor {name!r} is defined twice: by an initializer and by Constant node "
                             f"{node.name or name!r}")
        model.graph.initializer.append(numpy_helper.from_array(value, name))
        existing.add(name)
        moved += 1
    if moved:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return moved
