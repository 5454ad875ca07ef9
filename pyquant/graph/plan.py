"""Which tensors of a float model get a QuantizeLinear/DequantizeLinear pair, and which
share one scale. Decided once from the graph, before calibration.

Rules applied (all presets):
  * Conv, Gemm and MatMul take quantized activations and int8 weights; their bias
    becomes int32 with scale = input scale x weight scale.
  * Conv/Gemm/MatMul/Add followed by Relu or Clip (as the only consumer) is fused:
    no QDQ pair separates the layer from its activation, only the activation's output
    is quantized.
  * Data-movement ops (MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Slice,
    Pad, Resize, Gather, Split) keep their input scale on their output(s), every output
    of a Split included: they do not change values, so one scale loses nothing and needs
    no requantization.
  * Tensors leaving the quantized region (model outputs, and inputs read only by ops
    left in float) get a QDQ pair only with quantize_region_outputs. Without it the last
    layer keeps a float output: its inputs and weights are quantized, and onnxruntime
    runs it as an integer GEMM/convolution with a float result.
NPU CNN rules (enable_npu_cnn, part of XINT8):
  * Concat inputs and output share one scale (the NPU concatenates integer data).
  * AveragePool and GlobalAveragePool keep input scale = output scale.
Placement without NPU rules: quantization points sit on the inputs of compute ops
(Conv, Gemm, MatMul, pooling, Concat, an Add of two activations) and of the data-movement
ops that feed them; elementwise ops (activation functions, Mul, an Add/Sub/Div with a
constant) between them stay in float, with no QDQ pair of their own. A written-out
hard-swish, SiLU or GELU is then one float region between two layers instead of four
rounding points (on a paddle2onnx text detector, 266 pairs without this rule).
The per-row statistics of a written-out normalisation stay float (_normalization_statistics);
normalized_sums names the tensors summed into a normalisation, for the calibration rule that
keeps outlier-dominated ones float (pyquant.calibrate.table.outlier_dominated).
Ops not listed in OP_RULES stay in float; the plan records why.
"""
from __future__ import annotations

import dataclasses
import logging
from types import MappingProxyType
from typing import Dict, FrozenSet, List, Mapping, Optional, Tuple

import numpy as np

from onnx import ModelProto, NodeProto

from ..config import QuantConfig
from ..errors import ConfigError
from .view import GraphView, attribute


log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OpRule:
    activation_inputs: Optional[Tuple[int, ...]] = None  # None: every float input
    weight_input: Optional[int] = None
    bias_input: Optional[int] = None
    same_scale: bool = False  # every output shares the scale of input 0
    npu_same_scale: bool = False  # ... under the NPU CNN rules only
    npu_concat: bool = False  # all inputs and the output share one scale under NPU rules
    fusable: bool = False  # may absorb a following Relu/Clip
    # Float-region candidate: an elementwise op (unary, or binary with a constant operand)
    # that computes nothing a quantized kernel needs. Without NPU rules it stays float and
    # gets no QDQ pair of its own; with them (an NPU computes it in integers) it is quantized.
    elementwise: bool = False
    # Its integer form (QLinearConcat, QLinearAveragePool) re-quantizes its result: when that
    # result is not quantized (no quantized reader, region outputs off, no NPU rules) the QDQ
    # pairs on its inputs only round, so it stays float (_float_region). On YOLOv8n's decoding
    # tail the Concat of boxes and class scores rounded the boxes to 1.25-pixel steps and
    # clipped the scores at 0.68, and the Concat chain of the anchor grid moved the centres by
    # up to 0.08 cells.
    requantizes: bool = False


_DATA_MOVEMENT = OpRule(activation_inputs=(0,), same_scale=True)
_POOL_AVG = OpRule(activation_inputs=(0,), npu_same_scale=True, requantizes=True)
_UNARY = OpRule(activation_inputs=(0,), elementwise=True)

OP_RULES: Dict[str, OpRule] = {
    "Conv": OpRule(activation_inputs=(0,), weight_input=1, bias_input=2, fusable=True),
    "Gemm": OpRule(activation_inputs=(0,), weight_input=1, bias_input=2, fusable=True),
    "MatMul": OpRule(weight_input=1, fusable=True),
    "Add": OpRule(fusable=True, elementwise=True),  # a compute point when both operands are activations
    "Mul": OpRule(elementwise=True),
    "Concat": OpRule(npu_concat=True, requantizes=True),
    "MaxPool": _DATA_MOVEMENT, "Reshape": _DATA_MOVEMENT, "Flatten": _DATA_MOVEMENT,
    "Transpose": _DATA_MOVEMENT, "Squeeze": _DATA_MOVEMENT, "Unsqueeze": _DATA_MOVEMENT,
    "Slice": _DATA_MOVEMENT, "Pad": _DATA_MOVEMENT, "Resize": _DATA_MOVEMENT,
    # an embedding table (a constant data input) is a weight: int8, per row with per_channel
    "Gather": OpRule(activation_inputs=(0,), weight_input=0, same_scale=True), "Split": _DATA_MOVEMENT,
    "AveragePool": _POOL_AVG, "GlobalAveragePool": _POOL_AVG,
    "Relu": _UNARY, "Clip": _UNARY, "LeakyRelu": _UNARY, "Sigmoid": _UNARY,
    "HardSigmoid": _UNARY, "HardSwish": _UNARY, "PRelu": _UNARY, "Tanh": _UNARY, "Min": _UNARY, "Max": _UNARY,
    "Identity": _DATA_MOVEMENT,
}
FUSED_ACTIVATIONS = ("Relu", "Clip")
# Min/Max with a constant bound after Relu/Clip: a clipped activation with per-channel
# bounds (what cross-layer equalization makes of ReLU6); fused like Clip.
FUSED_BOUNDS = ("Min", "Max")


@dataclasses.dataclass(frozen=True)
class WeightUse:
    node: NodeProto
    input_index: int
    channel_axis: int  # axis of the output channels, for per-channel scales
    always_per_channel: bool = False  # one scale per row whatever the config (weight-only recurrent layers)


@dataclasses.dataclass(frozen=True)
class BiasUse:
    node: NodeProto
    input_index: int
    activation: str  # the quantized activation input whose scale multiplies the weight scale
    weight: str


@dataclasses.dataclass
class QuantPlan:
    activations: List[str]  # tensors that get a QDQ pair, in a stable order
    constant_activations: List[str]  # constant float inputs quantized with the activation type
    weights: List[WeightUse]
    biases: List[BiasUse]
    groups: List[List[str]]  # tensors that share one scale (each activation in exactly one group)
    skipped: Dict[str, str]  # node name -> reason it stays float
    float_tensors: Dict[str, str] = dataclasses.field(default_factory=dict)  # tensor -> reason it is not quantized
    excluded: FrozenSet[str] = frozenset()  # nodes the configuration excludes: they read float inputs

    def group_of(self) -> Dict[str, int]:
        return {t: gi for gi, members in enumerate(self.groups) for t in members}


class _UnionFind:
    def __init__(self) -> None:
        self.parent: Dict[str, str] = {}

    def add(self, x: str) -> None:
        self.parent.setdefault(x, x)

    def find(self, x: str) -> str:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _weight_axis(node: NodeProto, weight_rank: int) -> int:
    if node.op_type == "Gemm":
        return 0 if attribute(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return weight_rank - 1
    return 0


def _skip_reason(view: GraphView, node: NodeProto, rule: Optional[OpRule]) -> Optional[str]:
    """Why ``node`` stays in float, or None if it is quantized."""
    if node.op_type in WEIGHT_ONLY:
        return WEIGHT_ONLY_REASON
    if rule is None:
        return f"op type {node.op_type} has no quantized form here"
    if node.op_type in ("Gemm", "Conv") and not _has_constant_weight(view, node, rule):
        return "weight is not a constant initializer"
    return None


def _activation_inputs(view: GraphView, node: NodeProto, rule: OpRule) -> List[str]:
    """The inputs of a quantized node that are activations (not its constant weight)."""
    indices = rule.activation_inputs if rule.activation_inputs is not None else range(len(node.input))
    return [node.input[i] for i in indices if i < len(node.input)
            and not (i == rule.weight_input and view.is_constant(node.input[i]))]


def build_plan(model: ModelProto, enable_npu_cnn: bool, quantize_region_outputs: bool = True,
               keep_float: Mapping[str, str] = MappingProxyType({}), nodes_to_exclude: FrozenSet[str] = frozenset(),
               op_types_to_quantize: Optional[FrozenSet[str]] = None) -> QuantPlan:
    """The QDQ plan of ``model``: enable_npu_cnn applies the NPU CNN scale rules;
    quantize_region_outputs also quantizes tensors no quantized op reads (see above);
    ``keep_float`` ({tensor: reason}) are never quantized (e.g. found near-infinite in
    calibration), nor are constants with non-finite or near-infinite values.
    ``nodes_to_exclude`` / ``op_types_to_quantize``: the user's selection of nodes."""
    view = GraphView(model)
    excluded = _selection(view, model, nodes_to_exclude, op_types_to_quantize)
    float_tensors: Dict[str, str] = dict(keep_float)
    for node in model.graph.node:  # a rounded divisor can become 0, and 1/0 is inf
        for index in _DIVISOR_INPUTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index] and not view.is_constant(node.input[index]):
                float_tensors.setdefault(node.input[index], f"divisor of {node.op_type} {view.node_name(node)}: a value "
                                                            "rounded to zero would make it infinite")
    for name, reduce_node in _normalization_statistics(view, model).items():
        float_tensors.setdefault(name, f"{NORMALIZATION_STATISTICS_REASON} ({reduce_node})")
    if enable_npu_cnn:
        for name in _activation_interiors(view, model):
            float_tensors.setdefault(name, ACTIVATION_INTERIOR_REASON)
    order: List[str] = []
    seen = set()
    constants: List[str] = []
    weights: List[WeightUse] = []
    biases: List[BiasUse] = []
    skipped: Dict[str, str] = {}
    uf = _UnionFind()

    def want(name: str) -> bool:
        if not name or not view.is_float(name) or name in fused_outputs or name in float_tensors:
            return False
        if name not in seen and view.is_constant(name):
            reason = _unquantizable_constant(view.constant_value(name))
            if reason is not None:
                float_tensors[name] = reason
                return False
        if name not in seen:
            seen.add(name)
            order.append(name)
            uf.add(name)
            if view.is_constant(name):
                constants.append(name)
        return True

    fused_outputs = set()
    for node in model.graph.node:
        rule = OP_RULES.get(node.op_type)
        if rule is None or not rule.fusable:
            continue
        if node.op_type == "Add" and any(view.is_constant(i) for i in node.input):
            continue  # an Add of a constant is elementwise (e.g. the x + 3 of a hard-swish), not a layer
        current, allowed = node, FUSED_ACTIVATIONS
        while True:  # layer -> Relu/Clip [-> Min/Max with constant bound]*
            nxt = view.single_consumer(current.output[0])
            if nxt is None or nxt.op_type not in allowed or nxt.input[0] != current.output[0]:
                break
            if nxt.op_type in FUSED_BOUNDS and not all(view.is_constant(i) for i in nxt.input[1:]):
                break
            fused_outputs.add(current.output[0])
            current, allowed = nxt, FUSED_BOUNDS

    float_region = _float_region(view, model, fused_outputs, enable_npu_cnn, excluded, quantize_region_outputs)
    read_by_quantized = set()
    for node in model.graph.node:
        rule = OP_RULES.get(node.op_type)
        if _skip_reason(view, node, rule) is None and id(node) not in float_region:
            read_by_quantized.update(_activation_inputs(view, node, rule))

    for node in model.graph.node:
        rule = OP_RULES.get(node.op_type)
        reason = _skip_reason(view, node, rule)
        if reason is None and id(node) in float_region:
            reason = float_region[id(node)]
        if reason is not None:
            if node.op_type != "Constant":
                skipped[view.node_name(node)] = reason
            for index in WEIGHT_ONLY.get(node.op_type, ()) if id(node) not in excluded else ():
                if index < len(node.input) and view.is_constant(node.input[index]) and view.is_float(node.input[index]):
                    weights.append(WeightUse(node, index, 1, always_per_channel=True))
            continue
        act_inputs = [name for name in _activation_inputs(view, node, rule) if want(name)]
        if rule.weight_input is not None and rule.weight_input < len(node.input):
            w = node.input[rule.weight_input]
            if view.is_constant(w) and view.is_float(w):
                rank = len(view.constant_value(w).shape)
                weights.append(WeightUse(node, rule.weight_input, _weight_axis(node, rank)))
                if (rule.bias_input is not None and rule.bias_input < len(node.input)
                        and node.input[rule.bias_input] and view.is_constant(node.input[rule.bias_input])
                        and act_inputs):
                    biases.append(BiasUse(node, rule.bias_input, act_inputs[0], w))
        outputs = [o for o in node.output if o and o not in fused_outputs
                   and (quantize_region_outputs or o in read_by_quantized) and want(o)]
        if act_inputs and (rule.same_scale or (enable_npu_cnn and rule.npu_same_scale)):
            for name in outputs:  # every output: Split has several
                uf.union(name, act_inputs[0])
        if enable_npu_cnn and rule.npu_concat and outputs:
            for name in act_inputs:
                uf.union(name, outputs[0])

    groups: Dict[str, List[str]] = {}
    for name in order:
        groups.setdefault(uf.find(name), []).append(name)
    for name, reason in skipped.items():
        log.debug("leaving %s in float: %s", name, reason)
    return QuantPlan(order, constants, weights, biases, list(groups.values()), skipped, float_tensors,
                     frozenset(view.node_name(n) for n in model.graph.node if id(n) in excluded))


# Recurrent layers: onnxruntime computes them in float, so they stay float, but their
# weights W and R ([directions, gates x hidden, K]) are stored as int8, one scale per row.
# Measured on silero-vad's LSTM export (3532 chunks of real speech): int8 weights alone keep
# 0.9997 of the float model's decisions (28 dB), and inside the U8S8 per-channel model
# 0.9963 with or without them; the model is smaller, the arithmetic unchanged.
WEIGHT_ONLY: Dict[str, Tuple[int, ...]] = {"LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}
WEIGHT_ONLY_REASON = "recurrent layer: computed in float by onnxruntime; its weights are int8 (one scale per row)"

# Inputs that are divided by (or whose logarithm is taken): never quantized. Measured on a
# file-type classifier (tf2onnx LayerNorm written out): under XINT8 its standard deviation
# (0 to 0.19) took a power-of-two step of 0.0625, some values rounded to 0 and the
# Reciprocal after it returned inf.
_DIVISOR_INPUTS: Dict[str, Tuple[int, ...]] = {"Div": (1,), "Reciprocal": (0,), "Log": (0,)}

# Values at or beyond this magnitude are masks and sentinels (-inf, -3.4e38, -1e9 added to
# attention scores), not data: one 8-bit scale cannot hold them and the data too.
NEAR_INFINITE = 1e9


def _unquantizable_constant(value) -> Optional[str]:
    if value is None or value.size == 0 or value.dtype.kind != "f":
        return None
    if not np.all(np.isfinite(value)):
        return "constant with non-finite values (a mask or sentinel)"
    if float(np.max(np.abs(value))) >= NEAR_INFINITE:
        return f"constant with near-infinite values (|x| >= {NEAR_INFINITE:g}: a mask or sentinel)"
    return None


FLOAT_REGION_REASON = "elementwise op between quantized layers: computed in float (no NPU rules)"
UNREAD_REASON = "no quantized op reads its output (nor produces its input): computed in float"


def _fused_end(view: GraphView, name: str, fused_outputs: set) -> str:
    """The tensor a fused chain (layer -> Relu/Clip -> Min/Max) ends in."""
    while name in fused_outputs:
        name = view.single_consumer(name).output[0]
    return name


def _float_region(view: GraphView, model: ModelProto, fused_outputs: set, npu: bool,
                  excluded: Mapping[int, str], quantize_region_outputs: bool = True) -> Dict[int, str]:
    """{id(node): reason} of the nodes that stay float under the placement rule.

    Without NPU rules: elementwise ops (activations fused into their layer excepted).
    Then, consumers first (reverse graph order): a data-movement op, and without NPU rules
    an Add of two activations, is computed in integers only if a quantized op reads its
    output; with NPU rules a data-movement op also when a quantized op produces its input
    (an NPU passes integers through it). So an Identity between a float op and a model
    output, or a residual Add whose sum only a LayerNormalization reads, adds no pair.
    Without NPU rules and without quantize_region_outputs, the same holds for the ops
    that re-quantize their result (OpRule.requantizes: Concat, average pools)."""
    region: Dict[int, str] = dict(excluded)
    nodes = list(model.graph.node)
    for node in nodes:
        rule = OP_RULES.get(node.op_type)
        if npu or rule is None or not rule.elementwise or (node.input and node.input[0] in fused_outputs) \
                or id(node) in region:
            continue
        activations = [i for i in node.input if i and not view.is_constant(i)]
        if node.op_type == "Add" and len(activations) == 2:
            continue  # decided below, from its readers
        region[id(node)] = FLOAT_REGION_REASON

    def quantized(node) -> bool:
        rule = OP_RULES.get(node.op_type)
        return rule is not None and id(node) not in region and _skip_reason(view, node, rule) is None

    for node in reversed(nodes):
        rule = OP_RULES.get(node.op_type)
        if rule is None or id(node) in region or not node.output:
            continue
        two_activation_add = node.op_type == "Add" and not npu
        requantizing = rule.requantizes and not npu and not quantize_region_outputs
        if not (rule.same_scale or two_activation_add or requantizing):
            continue
        readers = [c for o in node.output if o
                   for c in view.consumers.get(_fused_end(view, o, fused_outputs), [])]
        if any(quantized(c) for c in readers):
            continue
        if npu and rule.same_scale:
            producer = view.producer.get(node.input[0]) if node.input else None
            if producer is not None and quantized(producer):
                continue
        region[id(node)] = UNREAD_REASON
    return region


def _selection(view: GraphView, model: ModelProto, nodes_to_exclude: FrozenSet[str],
               op_types: Optional[FrozenSet[str]]) -> Dict[int, str]:
    """{id(node): reason} of the nodes the user's selection leaves in float."""
    names = {view.node_name(n): n for n in model.graph.node}
    unknown = sorted(nodes_to_exclude - set(names) - {n.name for n in model.graph.node})
    if unknown:
        raise ConfigError(f"nodes_to_exclude names no node of the model: {', '.join(unknown[:5])}"
                          + (" ..." if len(unknown) > 5 else ""))
    if op_types is not None:
        unsupported = sorted(op_types - set(OP_RULES) - set(WEIGHT_ONLY))
        if unsupported:
            raise ConfigError(f"op_types_to_quantize has op types pyquant does not quantize: {', '.join(unsupported)}; "
                              f"it quantizes {', '.join(sorted(OP_RULES))}")
    excluded = {}
    for node in model.graph.node:
        if node.name in nodes_to_exclude or view.node_name(node) in nodes_to_exclude:
            excluded[id(node)] = "excluded by the configuration (nodes_to_exclude)"
        elif op_types is not None and node.op_type not in op_types and node.op_type != "Constant":
            excluded[id(node)] = "op type not in the configuration's op_types_to_quantize"
    return excluded


ACTIVATION_INTERIOR_REASON = ("inside a written-out activation (SiLU, GELU, Mish, ...): the activation is "
                              "quantized at its input and output only")
# Elementwise ops a written-out activation is made of (besides those in OP_RULES).
_ACTIVATION_PARTS = {"Sigmoid", "Tanh", "Erf", "Softplus", "Exp", "Div", "Mul", "Add", "Sub", "Pow", "Sqrt", "Neg",
                     "Relu", "Clip", "Min", "Max", "HardSigmoid", "Abs", "Reciprocal"}


def _activation_interiors(view: GraphView, model: ModelProto) -> List[str]:
    """The inner tensors of written-out activations: a group of two or more elementwise
    nodes that compute a function of one tensor x alone (constants aside) and hand one
    tensor to the rest of the graph (x * sigmoid(x), x * 0.5 * (1 + erf(x / sqrt 2)),
    x * tanh(softplus(x)), ...). Under NPU rules the activation is one quantization point,
    as an NPU computes it as one op: its inside is not quantized."""
    interiors: List[str] = []
    taken = set()
    for x in [i.name for i in model.graph.input] + [o for n in model.graph.node for o in n.output]:
        region, available = [], {x}
        grew = True
        while grew:
            grew = False
            for node in [c for name in list(available) for c in view.consumers.get(name, [])]:
                if id(node) in taken or node in region or node.op_type not in _ACTIVATION_PARTS:
                    continue
                inputs = [i for i in node.input if i and not view.is_constant(i)]
                if inputs and all(i in available for i in inputs):
                    region.append(node)
                    available.update(o for o in node.output if o)
                    grew = True
        if len(region) < 2:
            continue
        inside = {id(n) for n in region}
        exposed = [o for n in region for o in n.output if o and (
            o in view.graph_outputs or any(id(c) not in inside for c in view.consumers.get(o, [])))]
        if len(exposed) != 1:
            continue
        taken.update(inside)
        interiors.extend(o for n in region for o in n.output if o and o != exposed[0])
    return interiors


# Ops that normalise each row (token) of their input by that row's own statistics.
NORMALIZATIONS = ("LayerNormalization",)


def normalized_sums(model: ModelProto) -> Dict[str, str]:
    """{tensor: the normalisation it feeds} for the inputs of per-token normalisations
    (LayerNormalization, or a written-out one: x read by a ReduceMean and by a Sub of that
    mean) and, back through Add nodes (bias and residual additions), every activation
    summed into them. A normalisation divides each row by its own spread, so every channel
    of the sum matters relative to its own size, not to the tensor's largest channel
    (calibrate.table.outlier_dominated uses this)."""
    view = GraphView(model)
    found: Dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in NORMALIZATIONS:
            starts = node.input[:1]
        elif node.op_type == "ReduceMean":
            starts = [node.input[0]] if any(c.op_type == "Sub" and list(c.input[:2]) == [node.input[0], node.output[0]]
                                            for c in view.consumers.get(node.input[0], [])) else []
        else:
            continue
        pending = [name for name in starts if name and not view.is_constant(name)]
        while pending:
            name = pending.pop()
            if name in found:
                continue
            found[name] = view.node_name(node)
            producer = view.producer.get(name)
            if producer is not None and producer.op_type == "Add":
                pending.extend(i for i in producer.input if i and not view.is_constant(i))
    return found


NORMALIZATION_STATISTICS_REASON = ("per-row statistic of a written-out normalisation (mean, mean square, variance, "
                                   "1/std): computed in float, as a normalisation op computes it")
_REDUCTIONS = ("ReduceMean", "ReduceSum")
# Ops a normalisation's statistics pass through between the reduction and their use
# (besides _ACTIVATION_PARTS): reshaping and broadcasting to the input's shape.
_STATISTICS_MOVES = {"Reshape", "Expand", "Squeeze", "Unsqueeze", "Identity", "Cast"}
_COMBINING = {"Sub", "Mul", "Div", "Add"}


def _normalization_statistics(view: GraphView, model: ModelProto) -> Dict[str, str]:
    """{tensor: its reduction node} of the statistics inside written-out normalisations.

    From each ReduceMean/ReduceSum, the tensors computed from its output through
    elementwise and reshaping ops alone (other operands constants, shapes, or other such
    statistics), and the squares the reductions read (x * x read only by a reduction). They
    count as one normalisation when every op leaving them is an elementwise Sub/Mul/Div/Add
    that combines them with the data again ((x - mean) * 1/std, a softmax's exp(x) / sum):
    a pooled feature fed to a Conv or MatMul (squeeze-and-excitation, a classifier) is not
    one. Measured on a file-type
    classifier (tf2onnx writes var = E[x^2] - E[x]^2): quantizing E[x^2] and E[x]^2 to 8
    bits each left the variance at 10 dB and the classes at 0.066 agreement under XINT8."""
    float_ = lambda name: bool(name) and view.is_float(name) and not view.is_constant(name)
    parts = _ACTIVATION_PARTS | _STATISTICS_MOVES | set(_REDUCTIONS)
    region: Dict[str, str] = {}
    nodes = list(model.graph.node)
    for reduce_node in nodes:
        if reduce_node.op_type not in _REDUCTIONS or not float_(reduce_node.input[0]):
            continue
        name = view.node_name(reduce_node)
        stats = {reduce_node.output[0]}
        grew = True
        while grew:
            grew = False
            for node in nodes:
                if node.op_type not in parts or all(o in stats for o in node.output if o):
                    continue
                data = [i for i in node.input if float_(i)]
                if data and all(i in stats or i in region for i in data):
                    stats.update(o for o in node.output if o)
                    grew = True
        exits = [c for t in stats for c in view.consumers.get(t, []) if not all(o in stats for o in c.output if o)]
        if not exits or any(c.op_type not in _COMBINING or any(i in stats for i in c.output) for c in exits):
            continue
        if not any(float_(i) and i not in stats and i not in region for c in exits for i in c.input):
            continue
        squares = [r.input[0] for r in nodes if r.op_type in _REDUCTIONS and r.output[0] in stats
                   for p in [view.producer.get(r.input[0])] if p is not None and p.op_type in ("Mul", "Pow")
                   and len(view.consumers.get(r.input[0], [])) == 1
                   and (p.op_type == "Pow" or p.input[0] == p.input[1])]
        for tensor in list(stats) + squares:
            region.setdefault(tensor, name)
    return region


def plan_for(model: ModelProto, config: QuantConfig,
             keep_float: Mapping[str, str] = MappingProxyType({})) -> QuantPlan:
    """build_plan with the graph options of ``config``."""
    return build_plan(model, config.enable_npu_cnn, config.quantize_region_outputs, keep_float,
                      config.nodes_to_exclude, config.op_types_to_quantize)


def _has_constant_weight(view: GraphView, node: NodeProto, rule: OpRule) -> bool:
    return rule.weight_input is not None and rule.weight_input < len(node.input) \
        and view.is_constant(node.input[rule.weight_input])
