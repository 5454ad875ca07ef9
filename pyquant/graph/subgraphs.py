"""Control flow: quantizing the branch of an ``If`` that the calibration data takes.

onnxruntime returns only main-graph tensors, so the tensors inside an If branch cannot be
calibrated where they are. Graph preparation therefore inlines, for every If whose
condition has one value on the calibration batch it sees, the branch taken: its nodes
join the main graph and an Identity carries each branch output to the If's output
(flatten_taken_branches; nested Ifs are inlined in later rounds, once their condition is
a main-graph tensor). The flat model is planned, calibrated and written like any other;
the calibration pass checks on every batch that each inlined condition keeps its value
(the CalibrationError names the If otherwise). fold_branches then puts the If nodes
back: the written nodes that only the branch needs become the taken branch's body (its
QDQ pairs included), the other branch is the original float one, so the model still
computes both. The If outputs themselves stay float (a recurrent state fed back to the
next call, a final score), unless QuantConfig.tensor_types names them.

Loop and Scan bodies run once per iteration: they are not inlined but calibrated by
running them iteration by iteration (pyquant.graph.loops, pyquant.calibrate.loops).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Sequence, Set, Tuple

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, helper

from ..errors import ModelError
from ..runtime import Feed, check_feed, make_session
from .view import node_name, node_reads, outer_references, subgraphs

CONTROL_FLOW_OPS = ("If", "Loop", "Scan")
BRANCHES = {True: "then_branch", False: "else_branch"}
# Why a control-flow node named in nodes_to_exclude is left as it is
EXCLUDED_REASON = "excluded by the configuration"
# Rounds of inlining: each round inlines the Ifs at the top of what is left (nesting depth).
MAX_NESTING = 16


@dataclasses.dataclass
class InlinedBranch:
    """One If replaced in the main graph by the branch its condition chose."""

    node: NodeProto  # a copy of the original If node (both branches)
    value: bool  # the condition's value on the calibration data: then_branch if True
    # constants the untaken branch reads from the enclosing scope: nothing reads them in the
    # flat model, so its rewrites may drop them; folding puts back those missing
    untaken_constants: List[onnx.TensorProto] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return node_name(self.node)

    @property
    def cond(self) -> str:
        return self.node.input[0]

    @property
    def branch(self) -> GraphProto:
        return _graph_attribute(self.node, BRANCHES[self.value])


def _graph_attribute(node: NodeProto, name: str) -> GraphProto:
    for a in node.attribute:
        if a.name == name:
            return a.g
    raise ModelError(f"node {node.name or node.op_type!r} has no attribute {name!r}")


def _conditions(model: ModelProto, names: Sequence[str], feed: Feed) -> List[np.ndarray]:
    """Values of the boolean tensors ``names`` on ``feed`` (extra outputs of ``model``)."""
    unique = list(dict.fromkeys(names))
    session = make_session(model, unique, output_types={n: onnx.TensorProto.BOOL for n in unique})
    values = dict(zip(unique, session.run(unique, check_feed(session, feed, 0))))
    return [values[n] for n in names]


def inline_branch(model: ModelProto, index: int, value: bool) -> InlinedBranch:
    """Replace the If at ``model.graph.node[index]`` by its branch for ``value``, in place."""
    node = model.graph.node[index]
    inlined = InlinedBranch(NodeProto(), value)
    inlined.node.CopyFrom(node)
    branch = inlined.branch
    if len(branch.output) != len(node.output):
        raise ModelError(f"If node {inlined.name!r}: its {BRANCHES[value]} has {len(branch.output)} outputs, the "
                         f"node {len(node.output)}")
    constants = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    constants[n.output[0]] = onnx.TensorProto()
                    constants[n.output[0]].CopyFrom(a.t)
                    constants[n.output[0]].name = n.output[0]
    for name in sorted(outer_references(_graph_attribute(node, BRANCHES[not value]))):
        if name in constants:
            inlined.untaken_constants.append(constants[name])
    body: List[NodeProto] = [NodeProto() for _ in branch.node]
    for copy, original in zip(body, branch.node):
        copy.CopyFrom(original)
    initializers = [onnx.TensorProto() for _ in branch.initializer]
    for copy, original in zip(initializers, branch.initializer):
        copy.CopyFrom(original)
    # sibling scopes may reuse a name (both branches of two Ifs, e.g. the version
    # converter's _v_N): what the branch defines is renamed where the graph has it already
    existing = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    existing |= {o for n in model.graph.node for o in n.output if o}
    defined = [t.name for t in initializers] + [o for n in body for o in n.output if o]
    renamed = {name: unique_name(name, existing | set(defined)) for name in defined if name in existing}
    if renamed:
        for t in initializers:
            t.name = renamed.get(t.name, t.name)
        for n in body:
            _rename(n, renamed)
    body += [helper.make_node("Identity", [renamed.get(b.name, b.name)], [o], name=f"{o}_from_{BRANCHES[value]}")
             for b, o in zip(branch.output, node.output) if o]
    model.graph.initializer.extend(initializers)
    model.graph.value_info.extend(branch.value_info)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes[:index] + body + nodes[index + 1:])
    return inlined


def unique_name(name: str, taken: Set[str]) -> str:
    k = 1
    while f"{name}__inlined{k}" in taken:
        k += 1
    taken.add(f"{name}__inlined{k}")
    return f"{name}__inlined{k}"


def _rename(node: NodeProto, renamed: Dict[str, str]) -> None:
    """Rename what ``node`` reads and writes, and what its bodies read from outside (ONNX
    forbids shadowing, so a body never defines a name of its enclosing scope)."""
    for i, name in enumerate(node.input):
        node.input[i] = renamed.get(name, name)
    for i, name in enumerate(node.output):
        node.output[i] = renamed.get(name, name)
    for g in subgraphs(node):
        rename_graph(g, renamed)


def rename_graph(graph: GraphProto, renamed: Dict[str, str]) -> None:
    for n in graph.node:
        _rename(n, renamed)
    for values in (graph.input, graph.output, graph.value_info, graph.initializer):
        for v in values:
            v.name = renamed.get(v.name, v.name)


def defined_names(graph: GraphProto) -> Set[str]:
    """Every name a graph and the bodies in it define."""
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for n in graph.node:
        names |= {o for o in n.output if o}
        for g in subgraphs(n):
            names |= defined_names(g)
    return names


def flatten_taken_branches(model: ModelProto, feed: Feed, keep: Iterable[str] = ()
                           ) -> Tuple[ModelProto, List[InlinedBranch], Dict[str, str]]:
    """A copy of ``model`` with every If inlined whose condition is one boolean on ``feed``
    (nested ones too), except the If nodes named in ``keep``; also {node: why it stays}
    for the control-flow nodes left."""
    flat = ModelProto()
    flat.CopyFrom(model)
    keep = set(keep)
    inlined: List[InlinedBranch] = []
    left: Dict[str, str] = {}
    for _ in range(MAX_NESTING):
        candidates = [(i, n) for i, n in enumerate(flat.graph.node)
                      if n.op_type == "If" and node_name(n) not in keep and node_name(n) not in left]
        if not candidates:
            break
        values = _conditions(flat, [n.input[0] for _, n in candidates], feed)
        chosen = []
        for (i, n), v in zip(candidates, values):
            v = np.asarray(v)
            name = node_name(n)
            if v.size != 1:
                left[name] = f"its condition has {v.size} values"
                continue
            chosen.append((i, bool(v.reshape(-1)[0])))
        for i, v in sorted(chosen, reverse=True):  # from the back: the indices before stay valid
            inlined.append(inline_branch(flat, i, v))
    for n in flat.graph.node:
        name = node_name(n)
        if n.op_type in CONTROL_FLOW_OPS and name not in left:
            left[name] = (EXCLUDED_REASON if name in keep else
                          f"{n.op_type} body: calibrated by stepping it (pyquant.graph.loops) or reported there")
    return flat, inlined, left


# Ops that pass values through unchanged (data inputs: all of Concat's, the first of the others)
VALUE_PRESERVING = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice", "Split",
                    "Concat")


def value_preserving_ancestry(graph: GraphProto, names: Iterable[str]) -> Dict[str, str]:
    """{tensor: the tensor of ``names`` it reaches}: ``names`` themselves and the tensors of
    ``graph`` whose values reach one of them unchanged (through Identity, Reshape, Concat, ...)."""
    producer = {o: n for n in graph.node for o in n.output if o}
    found: Dict[str, str] = {}
    for origin in names:
        stack = [origin]
        while stack:
            name = stack.pop()
            if name in found:
                continue
            found[name] = origin
            node = producer.get(name)
            if node is not None and node.op_type in VALUE_PRESERVING:
                stack.extend(i for i in (node.input if node.op_type == "Concat" else node.input[:1]) if i)
    return found


def if_outputs(model: ModelProto, inlined: Sequence[InlinedBranch]) -> Dict[str, str]:
    """{tensor: why it stays float} in the flat ``model``: each inlined If's outputs, and the
    tensors whose values reach one unchanged (through Identity, Reshape, Concat, ...): a
    recurrent state fed back to the next call, or a final score, leaves the branch as the
    float model computes it."""
    out: Dict[str, str] = {}
    for b in inlined:
        why = f"reaches an output of If node {b.name} unchanged (control-flow outputs stay float)"
        for name in value_preserving_ancestry(model.graph, [o for o in b.node.output if o]):
            out.setdefault(name, why)
    return out


def _toposort(nodes: List[NodeProto], available: Set[str]) -> List[NodeProto]:
    """``nodes`` in an order where each comes after the producers of what it reads (stable:
    the given order where it is already valid)."""
    produced_by = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    reads = [node_reads(n) for n in nodes]
    done: Set[int] = set()
    order: List[NodeProto] = []
    ready = set(available)
    pending = list(range(len(nodes)))
    while pending:
        progressed = False
        rest = []
        for i in pending:
            if all(r in ready or r not in produced_by for r in reads[i]):
                order.append(nodes[i])
                done.add(i)
                ready.update(o for o in nodes[i].output if o)
                progressed = True
            else:
                rest.append(i)
        if not progressed:
            raise ModelError("internal error: folding If branches made a cycle")
        pending = rest
    return order


def _fold_one(model: ModelProto, b: InlinedBranch) -> None:
    graph = model.graph
    defined = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    graph.initializer.extend(t for t in b.untaken_constants if t.name not in defined)
    nodes = list(graph.node)
    outputs = [o for o in b.node.output if o]
    produced_by = {o: n for n in nodes for o in n.output if o}
    missing = [o for o in outputs if o not in produced_by]
    if missing:
        raise ModelError(f"internal error: If node {b.name}: no node computes {missing[0]} after quantization")

    def ancestors(names: Iterable[str], stop: Set[str]) -> Set[int]:
        found: Set[int] = set()
        stack = [n for n in names if n in produced_by and n not in stop]
        while stack:
            node = produced_by[stack.pop()]
            if id(node) in found:
                continue
            found.add(id(node))
            stack.extend(r for r in node_reads(node) if r in produced_by and r not in stop)
        return found

    body_ids = ancestors(outputs, set())
    # nodes outside the branch keep what they read outside (the If reads it from there)
    outside_ids = {id(n) for n in nodes} - body_ids
    # the untaken branch reads from the enclosing scope too: that stays outside
    untaken = outer_references(_graph_attribute(b.node, BRANCHES[not b.value]))
    while True:
        demanded = {b.cond} | {o.name for o in graph.output} | untaken
        for n in nodes:
            if id(n) in outside_ids:
                demanded |= node_reads(n)
        demanded -= set(outputs)  # computed by the If again
        keep_out = ancestors(demanded, set(outputs)) & body_ids
        if not keep_out:
            break
        body_ids -= keep_out
        outside_ids |= keep_out
    body = [n for n in nodes if id(n) in body_ids]
    # the body cannot redefine the If's output names (no shadowing): its outputs are renamed
    renamed = {o: f"{o}__{BRANCHES[b.value]}" for o in outputs}
    for n in body:
        for i, name in enumerate(n.output):
            n.output[i] = renamed.get(name, name)
        for i, name in enumerate(n.input):
            n.input[i] = renamed.get(name, name)
    original = b.branch
    body_graph = helper.make_graph(body, original.name or BRANCHES[b.value], [], [
        helper.make_value_info(renamed[o], vi.type) for vi, o in zip(original.output, b.node.output) if o])
    folded = NodeProto()
    folded.CopyFrom(b.node)
    # the untaken branch may define a name that its sibling, now in the flat graph, defined
    # too (the version converter's _v_N): legal between siblings, shadowing now
    outer = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    outer |= {o for n in nodes for o in n.output if o}
    for a in folded.attribute:
        if a.name == BRANCHES[b.value]:
            a.g.CopyFrom(body_graph)
        elif a.name == BRANCHES[not b.value]:
            clashes = sorted(defined_names(a.g) & outer)
            taken = outer | defined_names(a.g)
            rename_graph(a.g, {name: unique_name(name, taken) for name in clashes})
    outside = [n for n in nodes if id(n) not in body_ids]
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    del graph.node[:]
    graph.node.extend(_toposort(outside + [folded], available))


def fold_branches(model: ModelProto, inlined: Sequence[InlinedBranch]) -> ModelProto:
    """A copy of the quantized flat ``model`` with each inlined If put back (innermost
    first): the nodes only the branch needs become its body."""
    folded = ModelProto()
    folded.CopyFrom(model)
    for b in reversed(inlined):
        _fold_one(folded, b)
    return folded
