"""Bias correction of weight rounding (Nagel et al. 2019, "Data-Free Quantization Through
Weight Equalization and Bias Correction", section 4.2), with empirical input means.

Rounding a layer's weights W to W_q shifts the mean of every output channel:
E[W_q x] - E[W x] = (W_q - W) E[x]. Per-channel weights hide it, per-tensor weights (and
depthwise layers, whose channels have only k*k weights) do not. Adding (W - W_q) E[x] to
the bias removes the shift. E[x], the per-channel mean of the layer's input, is streamed
during calibration (pyquant.kernels.channel_sums), so this costs one extra pass over the
inputs of weighted layers and no extra inference. For a convolution E[x] is taken over
all positions, so the zero padding at the borders is not modelled.
"""
from __future__ import annotations

import logging
from typing import Dict, Mapping, Optional

import numpy as np
from onnx import ModelProto, NodeProto

from ..calibrate.runner import StatisticsRequest
from ..graph.plan import QuantPlan
from ..graph.view import GraphView, attribute
from ..qparams import QuantTable
from .base import QuantState, Stage, Technique

log = logging.getLogger(__name__)


def _input_channel_axis(node: NodeProto) -> Optional[int]:
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm" and not attribute(node, "transA", 0):
        return 1
    return None  # MatMul has no bias input; transposed Gemm inputs are rare


def needed_means(plan: QuantPlan) -> Dict[str, int]:
    """{input tensor: channel axis} whose per-channel means the correction needs."""
    needed = {}
    for use in plan.weights:
        axis = _input_channel_axis(use.node)
        if axis is not None:
            needed[use.node.input[0]] = axis
    return needed


def output_shift(node: NodeProto, weight_error: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(W - W_q) E[x] per output channel (any weight-shaped array in place of W - W_q: W E[x])."""
    if node.op_type == "Conv":
        groups = attribute(node, "group", 1)
        out_channels, in_per_group = weight_error.shape[:2]
        per_input = weight_error.reshape(out_channels, in_per_group, -1).sum(axis=2)
        per_input = per_input.reshape(groups, out_channels // groups, in_per_group)
        return np.einsum("goi,gi->go", per_input, mean.reshape(groups, in_per_group)).reshape(out_channels)
    return weight_error @ mean if attribute(node, "transB", 0) else mean @ weight_error


def add_to_bias(view: GraphView, node: NodeProto, shift: np.ndarray, suffix: str) -> bool:
    """Add ``shift`` (one value per output channel) to the bias of a Conv/Gemm ``node``,
    as a new initializer named after the old bias (or the output) and ``suffix``; a layer
    without a bias gains one. False (nothing changed) when the bias has another shape."""
    has_bias = len(node.input) > 2 and node.input[2]
    bias = view.constant_value(node.input[2]).astype(np.float64) if has_bias else np.zeros(shift.shape)
    if bias.shape != shift.shape:
        log.info("%s skips %s: bias shape %s is not [%d]", suffix, view.node_name(node), bias.shape, shift.shape[0])
        return False
    shared = has_bias and len(view.consumers.get(node.input[2], [])) > 1  # each layer gets a bias of its own
    if has_bias and not shared:  # a bias this suffix already named is replaced, not renamed again
        name = node.input[2] if node.input[2].endswith(f"_{suffix}") else f"{node.input[2]}_{suffix}"
    else:
        name = f"{node.output[0]}_{suffix}"
    view.replace_initializer(name, (bias + shift).astype(np.float32))
    if has_bias:
        node.input[2] = name
    else:
        while len(node.input) < 2:
            node.input.append("")
        node.input.append(name)
    return True


def apply_bias_correction(model: ModelProto, plan: QuantPlan, means: Mapping[str, np.ndarray],
                          table: QuantTable, per_channel: bool) -> int:
    """Correct the biases of ``model`` in place (adding a bias where a layer has none) for
    the rounding of the weights in ``table``; ``plan`` must come from ``model``. Returns the
    number of layers corrected."""
    view = GraphView(model)
    corrected = 0
    for use in plan.weights:
        node = use.node
        if _input_channel_axis(node) is None or node.input[0] not in means:
            continue
        w = view.constant_value(node.input[use.input_index]).astype(np.float64)
        error = w - table.weight(use, per_channel).dequantized()
        shift = output_shift(node, error, means[node.input[0]])
        if not add_to_bias(view, node, shift, "bias_corrected"):
            continue
        corrected += 1
    log.info("bias correction: %d layers", corrected)
    return corrected


class BiasCorrection(Technique):
    """Streams the input means of the weighted layers in the calibration pass, then
    corrects their biases for the table's weight rounding."""

    name = "bias_correction"
    stage = Stage.PARAMETERS

    @classmethod
    def from_config(cls, config) -> Optional["BiasCorrection"]:
        return cls() if config.bias_correction else None

    def statistics_needed(self, state: QuantState) -> StatisticsRequest:
        return StatisticsRequest(needed_means(state.plan))

    def apply(self, state: QuantState) -> None:
        means = {name: c.mean for name, c in state.statistics.channel_means.items()}
        state.reports[self.name] = apply_bias_correction(state.model, state.plan, means, state.table,
                                                         state.config.per_channel)
        state.replan()  # layers may have gained a bias input
