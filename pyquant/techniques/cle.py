"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", section 4.1).

For two layers joined by a positively homogeneous function f (f(x / s) = f(x) / s for
s > 0: identity, Relu, LeakyRelu, zero padding), dividing output channel i of the first
layer (weights and bias) by s_i and multiplying input channel i of the second layer by
s_i leaves the network's function unchanged. With s_i = sqrt(r1_i / r2_i) both channels
end with the range sqrt(r1_i r2_i), which evens out per-channel weight ranges (depthwise
layers above all) so that one scale per tensor fits them. Pairs are equalized in graph
order, repeatedly, until no scale moves by more than ``tolerance``: a 1x1 -> depthwise ->
1x1 block is two overlapping pairs and converges to a balance of all three.

Clipped activations: Clip(x, lo, hi) is not homogeneous, but Clip(x / s, lo / s, hi / s)
= Clip(x, lo, hi) / s. ONNX Clip takes scalar bounds only, so a Clip whose channels were
scaled becomes Max(Min(x, hi / S), lo / S) with per-channel bound tensors (S the product
of all scales applied to the channel), or Relu + Min when lo = 0: the function is exact.
Alternatively (``replace_clip_with_relu``, the reference tool's ReplaceClip6Relu) the
Clip is replaced by Relu before equalizing, which changes the network.

Activation-aware scales (``activation_weight`` b > 0, given a few calibration batches):
s_i also divides channel i of the activation between the two layers, and after the
paper's equalization the ReLU6 bounds 6 / S_i of EfficientNet-Lite0 differ by three
orders of magnitude: one per-tensor activation scale then leaves the small channels
(depthwise outputs above all) a few levels. So the first layer's range r1_i is replaced by
r1_i^(1-b) (rho a_i)^b, with a_i the activation's measured channel range (max |x| over the
batches, tracked through the rescaling as a_i / S_i) and rho the ratio of their medians
(csrc/kernels/cle.h): b = 0 is the paper's data-free CLE, b = 1 balances only the
activation against the second layer. Measured on EfficientNet-Lite0 (XINT8, 500 val
images, benchmarks/imagenet_sample.py): see the README's results.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, helper

from .. import kernels
from ..config import CLE_MAX_SCALE, CLEOptions
from ..errors import ModelError
from ..graph.view import GraphView, attribute
from ..runtime import make_session
from .base import QuantState, Stage, Technique

log = logging.getLogger(__name__)

HOMOGENEOUS = ("Relu", "LeakyRelu", "Identity")
MAX_SCALE = CLE_MAX_SCALE  # scales are clamped so that a dead channel cannot blow up the other layer
# The equalized float model must reproduce the original's outputs within this relative
# error on a calibration batch: CLE is exact in real arithmetic, so anything above float32
# rounding is a bug (or a pattern CLE must not have touched), never a tuning matter.
EQUIVALENCE_RTOL = 1e-3


@dataclasses.dataclass
class Pair:
    first: NodeProto
    second: NodeProto
    between: List[NodeProto]  # the activation / Pad nodes in between, in order
    total_scale: np.ndarray  # product of all scales applied to the first layer's outputs
    activation_range: Optional[np.ndarray] = None  # channel max |x| of second.input[0], as scaled so far

    def describe(self) -> str:
        names = [self.first.name or self.first.output[0]] + [n.op_type for n in self.between] + \
                [self.second.name or self.second.output[0]]
        return " -> ".join(names)


@dataclasses.dataclass(frozen=True)
class CLEReport:
    pair_list: List[Pair]
    pairs: int
    sweeps: int
    max_scale_change: float  # of the last sweep
    rewritten_clips: int
    skipped: Dict[str, str]

    def summary(self) -> str:
        return (f"{self.pairs} pairs equalized in {self.sweeps} sweeps (last max scale change "
                f"{self.max_scale_change:.2g}), {self.rewritten_clips} Clip rewritten, {len(self.skipped)} layers left alone")


# ---- weight views -------------------------------------------------------------------

def _output_view(node: NodeProto, w: np.ndarray) -> np.ndarray:
    if node.op_type == "Gemm" and not attribute(node, "transB", 0):
        return w.reshape(1, w.shape[0], w.shape[1], 1)  # [K, N]: output channel = column
    return w.reshape(w.shape[0], 1, 1, -1)


def _input_view(node: NodeProto, w: np.ndarray) -> np.ndarray:
    if node.op_type == "Gemm":
        return w.reshape(1, w.shape[0], w.shape[1], 1) if attribute(node, "transB", 0) \
            else w.reshape(w.shape[0], 1, 1, -1)
    groups = attribute(node, "group", 1)
    out_channels, in_per_group = w.shape[:2]
    return w.reshape(groups, out_channels // groups, in_per_group, -1)


def _out_channels(node: NodeProto, w: np.ndarray) -> int:
    return w.shape[1] if node.op_type == "Gemm" and not attribute(node, "transB", 0) else w.shape[0]


def _in_channels(node: NodeProto, w: np.ndarray) -> int:
    if node.op_type == "Gemm":
        return w.shape[1] if attribute(node, "transB", 0) else w.shape[0]
    return w.shape[1] * attribute(node, "group", 1)


# ---- pattern search -----------------------------------------------------------------

def _is_weighted(view: GraphView, node: NodeProto) -> bool:
    if node.op_type == "Conv":
        return view.is_constant(node.input[1]) and (len(node.input) < 3 or not node.input[2]
                                                    or view.is_constant(node.input[2]))
    if node.op_type == "Gemm":
        return (view.is_constant(node.input[1]) and not attribute(node, "transA", 0)
                and attribute(node, "alpha", 1.0) == 1.0 and attribute(node, "beta", 1.0) == 1.0
                and (len(node.input) < 3 or view.is_constant(node.input[2])))
    return False


def _commutes_with_scaling(view: GraphView, node: NodeProto) -> Optional[str]:
    """None if node(x / s) = node(x) / s per channel (possibly after a Clip rewrite), else why not."""
    if node.op_type in HOMOGENEOUS:
        return None if node.op_type != "LeakyRelu" or attribute(node, "alpha", 0.01) > 0 else "LeakyRelu alpha <= 0"
    if node.op_type == "Clip":
        if any(i and not view.is_constant(i) for i in node.input[1:]):
            return "Clip bounds are not constants"
        return None
    if node.op_type == "Pad":
        mode = attribute(node, "mode", b"constant")
        value = view.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if mode not in (b"constant", "constant") or (value is not None and np.any(value != 0)):
            return "Pad is not zero padding"
        return None
    return f"{node.op_type} does not commute with per-channel scaling"


def find_pairs(model: ModelProto) -> (List[Pair], Dict[str, str]):
    """Conv/Gemm -> [Relu | LeakyRelu | Clip | zero Pad]* -> Conv/Gemm chains, each tensor on
    the way used once. Returns the pairs and, for weighted layers followed by something
    else, why they were left alone."""
    view = GraphView(model)
    pairs, skipped = [], {}
    for node in model.graph.node:
        if not _is_weighted(view, node):
            continue
        between, current = [], node
        while True:
            nxt = view.single_consumer(current.output[0])
            if nxt is None:
                break
            if _is_weighted(view, nxt) and nxt.input[0] == current.output[0]:
                w1 = view.constant_value(node.input[1])
                w2 = view.constant_value(nxt.input[1])
                if _out_channels(node, w1) == _in_channels(nxt, w2):
                    pairs.append(Pair(node, nxt, between, np.ones(_out_channels(node, w1), np.float32)))
                else:
                    skipped[view.node_name(node)] = "channel counts of the pair do not match"
                break
            reason = _commutes_with_scaling(view, nxt)
            if reason is not None:
                if nxt.op_type not in ("Add", "Concat", "GlobalAveragePool", "Reshape", "Flatten"):
                    skipped[view.node_name(node)] = reason
                break
            between.append(nxt)
            current = nxt
    return pairs, skipped


# ---- the transform ------------------------------------------------------------------

def replace_clips_with_relu(model: ModelProto) -> int:
    """Replace every Clip between equalizable layers by Relu (changes the function)."""
    return _replace_clips_with_relu(model, find_pairs(model)[0])


def _replace_clips_with_relu(model: ModelProto, pairs: Sequence[Pair]) -> int:
    replaced = 0
    for pair in pairs:
        for node in pair.between:
            if node.op_type == "Clip":
                del node.input[1:]
                node.op_type = "Relu"
                replaced += 1
    return replaced


def _rewrite_clips(model: ModelProto, view: GraphView, pairs: Sequence[Pair]) -> int:
    """Clip(lo, hi) on scaled channels -> Relu/Max + Min with per-channel bounds lo / S, hi / S."""
    rewritten = 0
    for pair in pairs:
        if np.all(pair.total_scale == 1.0):
            continue
        for node in [n for n in pair.between if n.op_type == "Clip"]:
            lo = view.constant_value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            hi = view.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            shape = (1, -1) if pair.first.op_type == "Gemm" else (1, -1, 1, 1)
            inv = (1.0 / pair.total_scale.astype(np.float64)).reshape(shape)
            src, out = node.input[0], node.output[0]
            new_nodes = []
            if lo is not None and float(lo) == 0.0:
                new_nodes.append(helper.make_node("Relu", [src], [out + "_cle_relu"], name=(node.name or out) + "_relu"))
            elif lo is not None:
                bound = f"{out}_cle_lower_bound"
                view.replace_initializer(bound, (float(lo) * inv).astype(np.float32))
                new_nodes.append(helper.make_node("Max", [src, bound], [out + "_cle_relu"], name=(node.name or out) + "_max"))
            else:
                new_nodes.append(helper.make_node("Identity", [src], [out + "_cle_relu"]))
            if hi is not None:
                bound = f"{out}_cle_upper_bound"
                view.replace_initializer(bound, (float(hi) * inv).astype(np.float32))
                new_nodes.append(helper.make_node("Min", [new_nodes[-1].output[0], bound], [out],
                                                  name=(node.name or out) + "_min"))
            else:
                new_nodes[-1].output[0] = out
            index = list(model.graph.node).index(node)
            model.graph.node.remove(node)
            for k, n in enumerate(new_nodes):
                model.graph.node.insert(index + k, n)
            rewritten += 1
    return rewritten


def measure_activation_ranges(model: ModelProto, pairs: Sequence[Pair],
                              feeds: Sequence[Dict[str, np.ndarray]]) -> None:
    """Set each pair's activation_range: per channel max |x| of the tensor its second layer
    reads, over ``feeds``, with the model as it is now (before any rescaling)."""
    _observe(model, pairs, feeds, ranges=True, check=0, probes=False)


def _observe(model: ModelProto, pairs: Sequence[Pair], feeds: Sequence[Dict[str, np.ndarray]], ranges: bool,
             check: int, probes: bool) -> List[Dict[str, np.ndarray]]:
    """One session of ``model`` over ``feeds`` (only the first ``check`` of them without
    ``ranges``): with ``ranges``, each pair's activation_range; returned, for each of the
    first ``check`` feeds, the model's outputs, and with ``probes`` each pair's second
    layer's output too. The session's extra outputs are the range tensors (and the probes):
    the same session, hence the same bits, as a range measurement alone."""
    names = list(dict.fromkeys(p.second.input[0] for p in pairs)) if ranges else []
    extra = list(dict.fromkeys(names + ([p.second.output[0] for p in pairs] if probes else [])))
    compared = list(dict.fromkeys([o.name for o in model.graph.output] + extra[len(names):]))
    feeds = list(feeds) if ranges else list(feeds)[:check]
    if not feeds or not (names or check):
        return []
    session = make_session(model, extra)
    found: Dict[str, np.ndarray] = {}
    kept: List[Dict[str, np.ndarray]] = []
    for index, feed in enumerate(feeds):
        fetch = list(dict.fromkeys(names + compared)) if index < check else names
        values = dict(zip(fetch, session.run(fetch, feed)))
        if index < check:
            kept.append({name: values[name] for name in compared})
        for name in names:
            value = np.ascontiguousarray(values[name], dtype=np.float32)
            # channel axis 1 of [N, C, ...]: the kernel's view [1, N, C, rest]
            m = kernels.channel_abs_max(value.reshape(1, value.shape[0], value.shape[1], -1))
            found[name] = np.maximum(found[name], m) if name in found else m
        values = value = None  # one batch of activations alive at a time
    if ranges:
        for pair in pairs:
            pair.activation_range = found[pair.second.input[0]].astype(np.float64)
    return kept


class _Initializers:
    """The pairs' weights and biases as float32 arrays while the sweeps run, written into the
    model once at the end: converting every tensor to and from its TensorProto at each step
    of each sweep cost more than the arithmetic (the values are the same either way)."""

    def __init__(self, view: GraphView) -> None:
        self.view = view
        self.arrays: Dict[str, np.ndarray] = {}

    def get(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            self.arrays[name] = np.ascontiguousarray(self.view.constant_value(name).astype(np.float32))
        return self.arrays[name]

    def set(self, name: str, value: np.ndarray) -> None:
        self.arrays[name] = value

    def write(self) -> None:
        for name, value in self.arrays.items():
            self.view.replace_initializer(name, value)


def _equalize_pair(tensors: _Initializers, pair: Pair, scale_append_bias: bool, activation_weight: float) -> float:
    """One equalization of a pair in place; returns max |s - 1| of this step."""
    w1 = tensors.get(pair.first.input[1])
    w2 = tensors.get(pair.second.input[1])
    has_bias = len(pair.first.input) > 2 and pair.first.input[2]
    b1 = tensors.get(pair.first.input[2]) if has_bias else None
    r1 = kernels.channel_abs_max(_output_view(pair.first, w1))
    if scale_append_bias and b1 is not None:
        r1 = np.maximum(r1, np.abs(b1))
    r2 = kernels.channel_abs_max(_input_view(pair.second, w2))
    act = pair.activation_range
    s = kernels.equalization_scales(r1, r2, MAX_SCALE, act, activation_weight)  # act None: weights only
    kernels.scale_channels(_output_view(pair.first, w1), s, divide=True)
    kernels.scale_channels(_input_view(pair.second, w2), s, divide=False)
    if b1 is not None:
        tensors.set(pair.first.input[2], (b1 / s).astype(np.float32))
    pair.total_scale = (pair.total_scale * s).astype(np.float32)
    if act is not None:
        pair.activation_range = act / s
    return float(np.max(np.abs(s - 1.0))) if s.size else 0.0


def _own_weights(model: ModelProto, view: GraphView, pairs: Sequence[Pair]) -> None:
    """Give every weight of a pair its own initializer (a shared one must not be scaled twice)."""
    counts: Dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
    for pair in pairs:
        for node, idx in ((pair.first, 1), (pair.first, 2), (pair.second, 1)):
            if idx < len(node.input) and node.input[idx] and counts.get(node.input[idx], 0) > 1:
                new = f"{node.input[idx]}_cle_{node.output[0]}"
                view.replace_initializer(new, view.constant_value(node.input[idx]).copy())
                counts[node.input[idx]] -= 1
                node.input[idx] = new


def equalize(model: ModelProto, options: CLEOptions = CLEOptions(),
             feeds: Sequence[Dict[str, np.ndarray]] = (), check_feeds: int = 0) -> CLEReport:
    """Cross-layer equalize ``model`` in place (run after BatchNormalization folding).
    ``feeds``: calibration batches for activation-aware scales (without them, or with
    activation_weight 0, the scales depend on the weights only). ``check_feeds`` > 0: the
    equalized model must reproduce the original's outputs on that many of ``feeds``
    (check_equivalence, EQUIVALENCE_RTOL); the original's outputs are taken in the same
    inference pass as the activation ranges, so no copy of the original is needed."""
    pairs, skipped = find_pairs(model)
    view = GraphView(model)
    _own_weights(model, view, pairs)
    if options.replace_clip_with_relu:
        _replace_clips_with_relu(model, pairs)
    # The original's outputs on the checked feeds come from the range pass; its serialized
    # form is kept only to name the pair that broke, should the check fail.
    original = model.SerializeToString() if check_feeds and feeds else None
    expected = _observe(model, pairs, feeds, ranges=options.activation_weight > 0, check=check_feeds, probes=False)
    change, sweeps = 0.0, 0
    tensors = _Initializers(view)
    for sweeps in range(1, options.steps + 1):
        change = max((_equalize_pair(tensors, p, options.scale_append_bias, options.activation_weight)
                      for p in pairs), default=0.0)
        if change <= options.tolerance:
            break
    tensors.write()
    rewritten = 0 if options.replace_clip_with_relu else _rewrite_clips(model, view, pairs)
    for name, reason in skipped.items():
        log.info("CLE leaves %s alone: %s", name, reason)
    log.info("CLE: %d pairs, %d sweeps (last max scale change %.2g), %d Clip rewritten", len(pairs), sweeps,
             change, rewritten)
    if expected:
        _compare(expected, model, feeds[:len(expected)], EQUIVALENCE_RTOL, pairs,
                 lambda: _observe(onnx.load_from_string(original), pairs, feeds, ranges=False,
                                  check=len(expected), probes=True))
    return CLEReport(pairs, len(pairs), sweeps, change, rewritten, skipped)


def _relative_error(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.max(np.abs(x - y))) / (float(np.max(np.abs(x))) or 1.0) if x.size else 0.0


def check_equivalence(original: ModelProto, equalized: ModelProto, feeds: Sequence[Dict[str, np.ndarray]],
                      rtol: float, pairs: Sequence[Pair] = ()) -> float:
    """Largest relative difference between the outputs of the two float models on ``feeds``.
    Above ``rtol``: ModelError naming the first pair whose second layer's output differs
    (each pair's second layer must reproduce its original output exactly)."""
    expected = _observe(original, pairs, feeds, ranges=False, check=len(feeds), probes=True)
    return _compare(expected, equalized, feeds, rtol, pairs, lambda: expected)


def _compare(expected: Sequence[Dict[str, np.ndarray]], equalized: ModelProto,
             feeds: Sequence[Dict[str, np.ndarray]], rtol: float, pairs: Sequence[Pair],
             original_probes: Callable[[], Sequence[Dict[str, np.ndarray]]]) -> float:
    """check_equivalence against the original's outputs ``expected`` (from _observe);
    ``original_probes()`` gives them with the pairs' outputs, to name a pair that broke."""
    probes = [p.second.output[0] for p in pairs]
    session = make_session(equalized, probes)
    final = [o.name for o in equalized.graph.output]
    worst = 0.0
    for index, (want, feed) in enumerate(zip(expected, feeds)):
        names = list(want)
        errors = {name: _relative_error(want[name], got)
                  for name, got in zip(names, session.run(names, feed)) if name in final}
        worst = max([worst, *errors.values()])
        if worst <= rtol:
            continue
        want = original_probes()[index]
        results = {name: (want[name], got) for name, got in zip(probes, session.run(probes, feed))}
        for pair, probe in zip(pairs, probes):
            if not _relative_error(*results[probe]) <= rtol:
                raise ModelError(f"cross-layer equalization of {pair.describe()} changed its output by "
                                 f"{_relative_error(*results[probe]):.2g} (relative, tolerance {rtol:g})")
        name = max(errors, key=errors.get)
        raise ModelError(f"cross-layer equalization changed output {name!r} by {errors[name]:.2g} (relative, "
                         f"tolerance {rtol:g})")
    return worst


class CrossLayerEqualization(Technique):
    """Equalize the float model (activation-aware with a few calibration samples), then
    check on a real batch that it still computes the same function."""

    name = "cle"
    stage = Stage.GRAPH

    def __init__(self, options: CLEOptions) -> None:
        self.options = options

    @classmethod
    def from_config(cls, config) -> Optional["CrossLayerEqualization"]:
        return cls(config.cle) if config.cross_layer_equalization else None

    def samples_needed(self) -> int:
        return self.options.activation_samples

    def apply(self, state: QuantState) -> None:
        # checked on a real batch, before any statistics are taken
        state.reports[self.name] = equalize(state.model, self.options, state.samples, check_feeds=1)
