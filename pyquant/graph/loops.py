"""Control flow: the bodies of ``Loop`` and ``Scan`` nodes as standalone models.

A body runs once per iteration, so its tensors are not outputs of the main graph and
cannot be calibrated where they are. Each top-level Loop/Scan body becomes a model of its
own (extract_bodies): the body's inputs (iteration number, condition, carried state, scan
slices), then each main-graph activation the body reads from the enclosing scope as an
extra input, and the main-graph constants it reads copied in as initializers. That model
is planned and written by the main graph's rules (pyquant.graph.plan, pyquant.graph.qdq);
the calibration pass (pyquant.calibrate.loops) runs it iteration by iteration on the
values the main graph gives the Loop, so the statistics see every iteration the data
takes, with a condition that depends on the data too. restore_bodies puts the written
body back into its node.

What is carried from one iteration to the next (Loop carried dependencies, Scan state)
and what accumulates over iterations (scan outputs) stays float, together with the
tensors whose values reach those outputs unchanged (the rule of If outputs,
pyquant.graph.subgraphs.value_preserving_ancestry): rounding fed back on every iteration
compounds. Naming such a tensor in ``QuantConfig.tensor_types`` quantizes it anyway.

Control flow nested in a body (an If or a Loop inside a Loop) stays float, reported.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Sequence, Set, Tuple

import onnx
from onnx import ModelProto, NodeProto, helper

from ..errors import ModelError
from .subgraphs import EXCLUDED_REASON, defined_names, rename_graph, unique_name, value_preserving_ancestry
from .view import GraphView, attribute, drop_unused_initializers, node_name, outer_references

LOOP_OPS = ("Loop", "Scan")
NESTED_REASON = "control flow inside a Loop/Scan body stays float (only top-level bodies are stepped)"


@dataclasses.dataclass
class LoopBody:
    """One Loop or Scan node of the main graph and its body as a standalone model."""

    node: NodeProto  # a copy of the node
    model: ModelProto  # the body: its own inputs, then ``outer`` as inputs; outer constants as initializers
    outer: List[str]  # main-graph activations the body reads (the model's last inputs)
    copied: List[str]  # main-graph initializers copied into the model
    keep_float: Dict[str, str]  # body tensor -> why it stays float (carried state, scan outputs)

    @property
    def name(self) -> str:
        return node_name(self.node)

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def inputs(self) -> List[str]:
        """The body's own inputs (without ``outer``)."""
        return [i.name for i in self.model.graph.input][:len(self.model.graph.input) - len(self.outer)]

    @property
    def outputs(self) -> List[str]:
        return [o.name for o in self.model.graph.output]

    @property
    def state_count(self) -> int:
        """Loop: carried dependencies; Scan: state variables."""
        if self.op_type == "Loop":
            return len(self.node.input) - 2
        return len(self.node.input) - int(attribute(self.node, "num_scan_inputs"))

    @property
    def nested(self) -> Set[str]:
        """Names of the control-flow nodes inside the body (they stay float)."""
        return {node_name(n) for n in self.model.graph.node if n.op_type in ("If",) + LOOP_OPS}

    @property
    def node_names(self) -> Set[str]:
        """Names (as reports write them) of the body's nodes."""
        return {node_name(n) for n in self.model.graph.node} | {n.name for n in self.model.graph.node if n.name}


def _body(node: NodeProto) -> onnx.GraphProto:
    for a in node.attribute:
        if a.name == "body":
            return a.g
    raise ModelError(f"{node.op_type} node {node_name(node)!r} has no body")


def _state_reasons(node: NodeProto, body: onnx.GraphProto) -> Dict[str, str]:
    """{body input/output: why it stays float}: carried state in and out, scan outputs."""
    name = node_name(node)
    if node.op_type == "Loop":
        carried = len(node.input) - 2
        state_in, state_out = list(body.input)[2:2 + carried], list(body.output)[1:1 + carried]
        scan_out = list(body.output)[1 + carried:]
    else:
        carried = len(node.input) - int(attribute(node, "num_scan_inputs"))
        state_in, state_out = list(body.input)[:carried], list(body.output)[:carried]
        scan_out = list(body.output)[carried:]
    state = f"state carried between iterations of {node.op_type} node {name} (recurrent state stays float)"
    scans = f"scan output of {node.op_type} node {name}, accumulated over iterations (stays float)"
    reasons = {v.name: state for v in state_in + state_out}
    reasons.update({v.name: scans for v in scan_out})
    return reasons


def _standalone(model: ModelProto, node: NodeProto) -> Tuple[ModelProto, List[str], List[str]]:
    """The body of ``node`` as a model; ModelError saying why it cannot be one."""
    view = GraphView(model)
    body = _body(node)
    for v in body.input:
        if not v.type.HasField("tensor_type") or not v.type.tensor_type.elem_type:
            raise ModelError(f"its body input {v.name!r} is not a typed tensor")
    references = sorted(outer_references(body))
    copied = [r for r in references if view.is_constant(r)]
    outer = [r for r in references if not view.is_constant(r)]
    unknown = [r for r in outer if r not in view.elem_type]
    if unknown:
        raise ModelError(f"its body reads {unknown[0]!r} from the main graph, whose type is unknown")
    graph = onnx.GraphProto()
    graph.CopyFrom(body)
    # onnxruntime's Loop does not hold a body to its declared sizes (a batch-1 export runs
    # batches of 8), a session of the body alone does: keep the ranks, free the sizes
    for value in list(graph.input) + list(graph.output):
        for k, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                dim.dim_param = f"{value.name}_dim{k}"
    del graph.value_info[:]
    graph.input.extend(helper.make_tensor_value_info(r, view.elem_type[r], None) for r in outer)
    graph.initializer.extend(onnx.numpy_helper.from_array(view.constant_value(r), r) for r in copied)
    standalone = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    try:
        standalone = onnx.shape_inference.infer_shapes(standalone)
    except Exception as e:  # onnx raises several types; any means "not a model by itself"
        raise ModelError(f"its body is not a valid model by itself ({str(e).splitlines()[0]})") from None
    return standalone, outer, copied


def extract_bodies(model: ModelProto, left: Mapping[str, str]) -> Tuple[List[LoopBody], Dict[str, str]]:
    """The Loop/Scan nodes of the main graph among ``left`` (graph preparation's
    control-flow nodes left, {node: reason}) as LoopBody, except those the configuration
    excludes; and {node: why it stays float} for the others of ``left`` that are Loop/Scan."""
    bodies: List[LoopBody] = []
    reasons: Dict[str, str] = {}
    for node in model.graph.node:
        name = node_name(node)
        if node.op_type not in LOOP_OPS or name not in left or left[name] == EXCLUDED_REASON:
            continue
        try:
            standalone, outer, copied = _standalone(model, node)
        except ModelError as e:
            reasons[name] = f"{node.op_type} body cannot be run by itself for calibration: {e}"
            continue
        copy = NodeProto()
        copy.CopyFrom(node)
        bodies.append(LoopBody(copy, standalone, outer, copied, _body_float_tensors(node, standalone)))
    return bodies, reasons


def _body_float_tensors(node: NodeProto, standalone: ModelProto) -> Dict[str, str]:
    """{body tensor: why it stays float}: the state and scan outputs, and what reaches the
    outputs unchanged."""
    reasons = _state_reasons(node, standalone.graph)
    outputs = [o.name for o in standalone.graph.output if o.name in reasons]
    out = dict(reasons)
    for name, origin in value_preserving_ancestry(standalone.graph, outputs).items():
        out.setdefault(name, reasons[origin])
    return out


def restore_bodies(model: ModelProto, written: Sequence[Tuple[LoopBody, ModelProto]]) -> ModelProto:
    """A copy of the quantized main ``model`` with each written body (the standalone model
    after write_qdq) put back into its node: the outer activations are read from the
    enclosing scope again, the copied constants too where the main graph still holds them
    unchanged; a name the body now defines that the main graph defines too is renamed."""
    out = ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes = {node_name(n): n for n in graph.node}
    for body, written_model in written:
        node = nodes.get(body.name)
        if node is None:
            raise ModelError(f"internal error: {body.op_type} node {body.name} is missing after quantization")
        g = onnx.GraphProto()
        g.CopyFrom(written_model.graph)
        outer = set(body.outer)
        kept_inputs = [i for i in g.input if i.name not in outer]
        del g.input[:]
        g.input.extend(kept_inputs)
        kept = [t for t in g.initializer
                if t.name not in body.copied or t.name not in initializers
                or t.SerializeToString() != initializers[t.name].SerializeToString()]
        del g.initializer[:]
        g.initializer.extend(kept)
        kept_info = [v for v in g.value_info if v.name not in outer]
        del g.value_info[:]
        g.value_info.extend(kept_info)
        main_names = {i.name for i in graph.input} | set(initializers) | {o for n in graph.node for o in n.output if o}
        clashes = sorted(defined_names(g) & main_names)
        taken = main_names | defined_names(g)
        rename_graph(g, {name: unique_name(name, taken) for name in clashes})
        for a in node.attribute:
            if a.name == "body":
                a.g.CopyFrom(g)
    drop_unused_initializers(out)
    return out
