"""Graph preparation: float-exact rewrites before any technique runs, each checked on a
calibration batch and reported.

    opset upgrade (to 13)                  pyquant.graph.rewrites.opset
    Constant nodes -> initializers         pyquant.graph.rewrites.constants
    BatchNormalization into the Conv before it, or unfolded before a layer that reads it
                                           pyquant.graph.rewrites.batchnorm
    written-out hard-swish / hard-sigmoid -> one op
                                           pyquant.graph.rewrites.activations
    constant Mul/Div/Add/Sub into the neighbouring Conv/Gemm/MatMul
                                           pyquant.graph.rewrites.affine

After each rewrite that changed something, the model's outputs on the batch must equal
the original model's within PREPARATION_RTOL (root-mean-square difference over the
output's root-mean-square; onnxruntime's graph optimizations are off for the check, as
their fusions change float rounding on their own), else ModelError naming the rewrite
(for the opset upgrade: the first node whose output changed). Shape inference runs last,
for the element types the plan reads.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import ModelProto

from .errors import ModelError
from .graph.rewrites.activations import fuse_activations
from .graph.rewrites.affine import fold_affines
from .graph.rewrites.batchnorm import fold_batch_norm, unfold_batch_norm_before_layers
from .graph.rewrites.constant_folding import fold_constant_data_movement
from .graph.rewrites.constants import constants_to_initializers
from .graph.rewrites.opset import MIN_OPSET, upgrade_opset
from .graph.subgraphs import BRANCHES, CONTROL_FLOW_OPS, InlinedBranch, flatten_taken_branches
from .graph.validate import check_definitions, check_not_quantized
from .graph.view import GraphView, node_name
from .runtime import Feed, check_feed, make_session

log = logging.getLogger(__name__)

# float32 folding reorders a few products per layer; 1e-5 of an output's RMS is far below
# any quantization step and above that rounding through a deep network (measured: BN
# folding moves PP-OCRv4's recognizer by 1.5e-5 of its largest output, and onnxruntime's
# own fusions by 2.5e-5, so the largest value is not the measure).
PREPARATION_RTOL = 1e-5

REWRITES: List[Tuple[str, Callable[[ModelProto], int]]] = [
    ("Constant nodes to initializers", constants_to_initializers),
    ("constant Slice/Concat/Reshape/... folded into initializers", fold_constant_data_movement),
    ("BatchNormalization folded into the Conv before it", fold_batch_norm),
    ("written-out hard-swish / hard-sigmoid fused into one op", fuse_activations),
    ("BatchNormalization unfolded before the layer that reads it", unfold_batch_norm_before_layers),
    ("constant Mul/Div/Add/Sub folded into Conv/Gemm/MatMul", fold_affines),
]


@dataclasses.dataclass
class PreparationReport:
    opset_from: int
    opset_to: int
    changes: Dict[str, int]  # rewrite -> places changed
    max_relative_change: float  # largest output change of any rewrite, relative
    # If nodes replaced by the branch the calibration batch takes (pyquant.graph.subgraphs);
    # the pipeline puts them back after writing the quantized model
    inlined: List[InlinedBranch] = dataclasses.field(default_factory=list)
    control_flow_left: Dict[str, str] = dataclasses.field(default_factory=dict)  # node -> why not inlined

    def summary(self) -> str:
        parts = [f"opset {self.opset_from} -> {self.opset_to}"] if self.opset_from != self.opset_to else []
        if self.inlined:
            parts.append(f"If branches inlined for calibration: {len(self.inlined)} ("
                         + ", ".join(f"{b.name}: {BRANCHES[b.value]}" for b in self.inlined[:4])
                         + (", ..." if len(self.inlined) > 4 else "") + ")")
        parts += [f"{name}: {n}" for name, n in self.changes.items() if n]
        return "graph preparation: " + ("; ".join(parts) if parts else "nothing to change")


def _outputs(model: ModelProto, feed: Feed, names: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
    names = names or [o.name for o in model.graph.output]
    session = make_session(model, [n for n in names if n not in {o.name for o in model.graph.output}],
                           optimize=False)
    return dict(zip(names, session.run(names, check_feed(session, feed, 0))))


def relative_change(reference: np.ndarray, value: np.ndarray) -> float:
    """RMS of the difference over the reference's RMS (0 or inf for non-float outputs)."""
    reference, value = np.asarray(reference), np.asarray(value)
    if reference.shape != value.shape:
        return float("inf")
    if reference.dtype.kind != "f":
        return 0.0 if np.array_equal(reference, value) else float("inf")
    if reference.size == 0:
        return 0.0
    reference = reference.astype(np.float64)
    rms = float(np.sqrt(np.mean(reference * reference)))
    return float(np.sqrt(np.mean((reference - value) ** 2))) / (rms or 1.0)


def _first_changed_node(original: ModelProto, upgraded: ModelProto, feed: Feed) -> str:
    """The first node (graph order) of ``original`` whose float output differs in ``upgraded``."""
    original, upgraded = onnx.shape_inference.infer_shapes(original), onnx.shape_inference.infer_shapes(upgraded)
    view, new_view = GraphView(original), GraphView(upgraded)
    names = [o for n in original.graph.node for o in n.output
             if o and view.is_float(o) and o in new_view.producer]
    if not names:
        return "(no comparable node output)"
    before, after = _outputs(original, feed, names), _outputs(upgraded, feed, names)
    for node in original.graph.node:
        for o in node.output:
            if o in before and relative_change(before[o], after[o]) > PREPARATION_RTOL:
                return f"{view.node_name(node)} ({node.op_type})"
    return "(none of the compared nodes; an output-only difference)"


def _check(name: str, model: ModelProto, reference: Dict[str, np.ndarray], feed: Feed) -> float:
    outputs = _outputs(model, feed, list(reference))
    worst_name, worst = max(((o, relative_change(reference[o], outputs[o])) for o in reference),
                            key=lambda t: t[1], default=("", 0.0))
    if worst > PREPARATION_RTOL:
        raise ModelError(f"graph preparation step '{name}' changed output {worst_name!r} by {worst:.2g} "
                         f"(relative, tolerance {PREPARATION_RTOL:g}): a bug of pyquant's, please report it")
    return worst


def prepare_graph(model: ModelProto, feeds: Sequence[Feed] = (), min_opset: int = MIN_OPSET,
                  keep_control_flow: Iterable[str] = ()) -> Tuple[ModelProto, PreparationReport]:
    """A prepared copy of ``model``, at ``min_opset`` or above; with ``feeds`` (one batch
    is used) every rewrite is checked against the original model's outputs, and each If
    (but those named in ``keep_control_flow``) is replaced by the branch the batch takes
    (pyquant.graph.subgraphs: the report's ``inlined`` says which, to fold them back)."""
    feed = feeds[0] if feeds else None
    check_not_quantized(model)
    upgraded, opset = upgrade_opset(model, min_opset)
    prepared = ModelProto()
    prepared.CopyFrom(upgraded)
    inlined: List[InlinedBranch] = []
    left: Dict[str, str] = {}
    if any(n.op_type in CONTROL_FLOW_OPS for n in prepared.graph.node):
        if feed is None:
            left = {node_name(n): "no calibration batch to choose its branch"
                    for n in prepared.graph.node if n.op_type in CONTROL_FLOW_OPS}
        else:
            prepared, inlined, left = flatten_taken_branches(prepared, feed,
                                                             keep_control_flow)
    worst = 0.0
    references: List[Dict[str, np.ndarray]] = []

    def expected() -> Dict[str, np.ndarray]:  # the original's outputs, run only if something changed
        if not references:
            references.append(_outputs(model, feed))
        return references[0]

    if opset < min_opset:
        log.info("upgraded the model from opset %d to %d", opset, min_opset)
        if feed is not None:
            reference = expected()
            outputs = _outputs(prepared, feed, list(reference))
            if any(relative_change(reference[o], outputs[o]) > PREPARATION_RTOL for o in reference):
                raise ModelError(f"the opset {opset} -> {min_opset} upgrade changed the model's outputs; first "
                                 f"node that differs: {_first_changed_node(model, prepared, feed)}")
    changes: Dict[str, int] = {}
    for name, rewrite in REWRITES:
        changes[name] = rewrite(prepared)
        if changes[name] and feed is not None:
            worst = max(worst, _check(name, prepared, expected(), feed))
    check_definitions(prepared)
    try:
        prepared = onnx.shape_inference.infer_shapes(prepared)
    except Exception as e:
        raise ModelError(f"shape inference failed: {e}") from None
    report = PreparationReport(opset, max(opset, min_opset), changes, worst, inlined, left)
    log.info(report.summary())
    return prepared, report
