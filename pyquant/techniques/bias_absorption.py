"""High-bias absorption (Nagel et al. 2019, "Data-Free Quantization", section 4.1.2).

After cross-layer equalization some channels of a ReLU activation sit far above zero: the
first layer's bias was scaled up with its weights. If channel i's pre-activation x_i
stays above c_i >= 0, then Relu(x_i) = Relu(x_i - c_i) + c_i, so c_i can leave the first
layer's bias and enter the second layer's as W2[:, i] c_i; the activation between them
then spans a range smaller by c_i, which its quantization scale no longer has to cover.
For a clipped activation Min(Relu(x), B) (ReLU6 after CLE's rewrite) the bound moves too:
Min(Relu(x - c), B - c) + c.

The paper takes c_i = max(0, beta_i - 3 gamma_i) from the BatchNormalization statistics
(mean beta, deviation gamma of x_i). BN is folded before this runs, and models need not
have BN, so pyquant measures the same statistics on calibration batches, and also
caps c_i at the smallest x_i seen there: c_i = max(0, min(mean_i - sigmas * std_i,
min_i)), and at the clip bound. Exact on those batches; inputs elsewhere that fall below
c_i are the approximation the paper accepts. Measured on EfficientNet-Lite0 after
activation-aware CLE (500 val images): in one-off runs the float model itself drops from
88.2 to 87.2 % top-1 with the 3-sigma rule alone (its depthwise outputs are far from
normal) and to 87.4 % with the cap; benchmarks/imagenet_sample.py's int8_cle_hba row gives
87.4 % for INT8_CLE (88.2 % without absorption). So it is off by
default (CLEOptions.high_bias_absorption).

Only exact cases are rewritten: the activation between the pair is Relu or Relu -> Min
with a constant bound, and the second layer has no padding (a zero-padded border would
lose the constant c_i). Other pairs are left alone and reported.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
from onnx import ModelProto, NodeProto

from ..graph.view import GraphView, attribute
from ..runtime import tensors_over
from .base import QuantState, Stage, Technique
from .cle import CLEReport, CrossLayerEqualization, Pair

log = logging.getLogger(__name__)
# c_i = mean_i - SIGMAS * std_i, the paper's rule (then capped at the smallest value seen).
# Not an option: the only model measured loses accuracy with absorption at all (above).
SIGMAS = 3.0


@dataclasses.dataclass(frozen=True)
class AbsorptionReport:
    pairs: int  # pairs whose biases moved
    channels: int  # channels with c_i > 0
    skipped: Dict[str, str]  # pair -> why it was left alone


def _chain(view: GraphView, pair: Pair) -> Optional[List[NodeProto]]:
    """The nodes between the pair's layers as the graph holds them now."""
    nodes, current = [], pair.first.output[0]
    while True:
        nxt = view.single_consumer(current)
        if nxt is None:
            return None
        if nxt.output[0] == pair.second.output[0]:
            return nodes
        nodes.append(nxt)
        current = nxt.output[0]


def _unsupported(view: GraphView, pair: Pair, chain: Optional[List[NodeProto]]) -> Optional[str]:
    if chain is None:
        return "the activation between the layers is used elsewhere"
    kinds = [n.op_type for n in chain]
    if kinds not in (["Relu"], ["Relu", "Min"]):
        return f"activation {' -> '.join(kinds) or 'none'} (only Relu or Relu -> Min is absorbed exactly)"
    if kinds[-1] == "Min" and view.constant_value(chain[1].input[1]) is None:
        return "the Min bound is not a constant"
    second = pair.second
    if second.op_type == "Conv":
        pads = attribute(second, "pads", [0, 0, 0, 0])
        auto_pad = attribute(second, "auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if any(pads) or auto_pad not in ("NOTSET", "VALID"):
            return "the second layer pads its input with zeros (the offset would be lost at the border)"
    return None


def _second_layer_shift(view: GraphView, second: NodeProto, c: np.ndarray) -> np.ndarray:
    """W2 applied to the constant input c: the second layer's bias increment."""
    w2 = view.constant_value(second.input[1]).astype(np.float64)
    if second.op_type == "Gemm":
        return (w2 @ c) if attribute(second, "transB", 0) else (c @ w2)
    groups = int(attribute(second, "group", 1))
    out_c, in_per_group = w2.shape[0], w2.shape[1]
    summed = w2.reshape(out_c, in_per_group, -1).sum(axis=2)  # [O, I/g]
    c_groups = c.reshape(groups, in_per_group)
    return np.einsum("gok,gk->go", summed.reshape(groups, out_c // groups, in_per_group), c_groups).ravel()


def _add_to_bias(model: ModelProto, view: GraphView, node: NodeProto, delta: np.ndarray) -> None:
    """bias += delta for a Conv/Gemm, creating the bias if it has none and giving it a
    bias of its own if another node shares the initializer."""
    name = node.input[2] if len(node.input) > 2 else ""
    shared = bool(name) and sum(name in n.input for n in model.graph.node) > 1
    if not name or shared:
        new = f"{node.output[0]}_absorbed_bias"
        base = view.constant_value(name).astype(np.float64) if name else np.zeros(delta.shape)
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = new
    else:
        new, base = name, view.constant_value(name).astype(np.float64)
    view.replace_initializer(new, (base + delta).astype(np.float32))


def _preactivation_stats(model: ModelProto, names: Sequence[str], feeds: Sequence[Dict[str, np.ndarray]]):
    """{tensor: (mean, std, min)} per channel (axis 1) over ``feeds``."""
    sums: Dict[str, np.ndarray] = {}
    squares: Dict[str, np.ndarray] = {}
    lows: Dict[str, np.ndarray] = {}
    counts: Dict[str, int] = {}
    for values in tensors_over(model, list(names), feeds):
        for name, value in zip(names, values):
            v = np.moveaxis(np.asarray(value, np.float64), 1, 0).reshape(value.shape[1], -1)
            sums[name] = sums.get(name, 0.0) + v.sum(axis=1)
            squares[name] = squares.get(name, 0.0) + (v * v).sum(axis=1)
            counts[name] = counts.get(name, 0) + v.shape[1]
            lows[name] = np.minimum(lows[name], v.min(axis=1)) if name in lows else v.min(axis=1)
    stats = {}
    for name in names:
        mean = sums[name] / counts[name]
        stats[name] = (mean, np.sqrt(np.maximum(squares[name] / counts[name] - mean * mean, 0.0)), lows[name])
    return stats


def absorb_high_biases(model: ModelProto, pairs: Sequence[Pair], feeds: Sequence[Dict[str, np.ndarray]],
                       sigmas: float = SIGMAS) -> AbsorptionReport:
    """Absorb the high biases of ``pairs`` (from cle.equalize, on the equalized ``model``)
    in place, with the pre-activation statistics measured on ``feeds``."""
    view = GraphView(model)
    skipped: Dict[str, str] = {}
    chosen = []
    for pair in pairs:
        chain = _chain(view, pair)
        reason = _unsupported(view, pair, chain)
        if reason is not None:
            skipped[pair.describe()] = reason
        else:
            chosen.append((pair, chain))
    if not chosen or not feeds:
        return AbsorptionReport(0, 0, skipped)
    stats = _preactivation_stats(model, [p.first.output[0] for p, _ in chosen], feeds)
    moved_pairs = moved_channels = 0
    for pair, chain in chosen:
        mean, std, low = stats[pair.first.output[0]]
        c = np.maximum(np.minimum(mean - sigmas * std, low), 0.0)
        bound = None
        if len(chain) == 2:
            given = view.constant_value(chain[1].input[1]).astype(np.float64)
            bound = np.broadcast_to(given.reshape(-1) if given.size > 1 else given.reshape(()), c.shape)
            c = np.minimum(c, bound)
        if not np.any(c > 0):
            continue
        _add_to_bias(model, view, pair.first, -c)
        if bound is not None:  # per channel, in the activation's layout (as cle writes it)
            layout = (1, -1) if pair.first.op_type == "Gemm" else (1, -1, 1, 1)
            bound_name = f"{chain[1].output[0]}_absorbed_bound"
            view.replace_initializer(bound_name, (bound - c).reshape(layout).astype(np.float32))
            chain[1].input[1] = bound_name
        _add_to_bias(model, view, pair.second, _second_layer_shift(view, pair.second, c))
        moved_pairs += 1
        moved_channels += int(np.count_nonzero(c))
    for name, reason in skipped.items():
        log.info("high-bias absorption leaves %s alone: %s", name, reason)
    log.info("high-bias absorption: %d channels in %d pairs", moved_channels, moved_pairs)
    return AbsorptionReport(moved_pairs, moved_channels, skipped)


class HighBiasAbsorption(Technique):
    """After cross-layer equalization, on its pairs and the samples it looked at."""

    name = "high_bias_absorption"
    stage = Stage.GRAPH

    def __init__(self, samples: int) -> None:
        self.samples = samples

    @classmethod
    def from_config(cls, config) -> Optional["HighBiasAbsorption"]:
        enabled = config.cross_layer_equalization and config.cle.high_bias_absorption
        return cls(config.cle.activation_samples) if enabled else None

    def samples_needed(self) -> int:
        return self.samples

    def apply(self, state: QuantState) -> None:
        cle_report = state.reports.get(CrossLayerEqualization.name)
        if not isinstance(cle_report, CLEReport):
            raise RuntimeError("high-bias absorption runs after cross-layer equalization (REGISTRY order)")
        state.reports[self.name] = absorb_high_biases(state.model, cle_report.pair_list, state.samples)
