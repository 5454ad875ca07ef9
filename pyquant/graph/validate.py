"""Structural checks that every stage of the pipeline must leave true (run by tests after
each stage): each tensor name is defined once, and each node input is defined."""
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
