"""Build the table of quantization parameters (pyquant.qparams.QuantTable) once, after
calibration: activations from their statistics (one QParams per scale-sharing group),
weights from the model's weights with nearest rounding."""
from __future__ import annotations

import dataclasses
from typing import AbstractSet, Dict, Mapping

import numpy as np
from onnx import ModelProto

from ..config import QuantConfig, QuantType
from ..errors import ConfigError
from ..graph.depth import layers_from_inputs, layers_to_outputs
from ..graph.plan import QuantPlan, normalized_sums
from ..graph.view import GraphView
from ..qparams import (BFLOAT16_QPARAMS, QParams, QuantizedWeight, QuantTable, WeightKey, quantize_array,
                       round_to_bfloat16, weight_key)
from .collector import TensorCollector
from .methods import activation_qparams, bulk_sqnr_db, weight_qparams


def group_qparams(plan: QuantPlan, collectors: Mapping[str, TensorCollector],
                  config: QuantConfig, unclipped: AbstractSet[str] = frozenset()) -> Dict[str, QParams]:
    """One QParams per scale-sharing group, computed from the group's merged statistics;
    a group with a member in ``unclipped`` keeps its whole range."""
    unknown = sorted(set(config.tensor_types) - set(plan.activations))
    if unknown:
        raise ConfigError(f"tensor_types names tensors that are not quantized activations: {', '.join(unknown[:5])}")
    result: Dict[str, QParams] = {}
    for members in plan.groups:
        merged = collectors[members[0]]
        for name in members[1:]:
            merged = merged.merged(collectors[name])
        qtype = max((config.tensor_types.get(m, config.activation_type) for m in members), key=lambda t: t.bits)
        group_config = config if qtype is config.activation_type else dataclasses.replace(config, activation_type=qtype)
        qp = activation_qparams(merged, group_config, unclipped=any(m in unclipped for m in members))
        for name in members:
            result[name] = qp
    return result


def nearest_weights(model: ModelProto, plan: QuantPlan, config: QuantConfig) -> Dict[WeightKey, QuantizedWeight]:
    """Every planned weight's parameters and nearest-rounded integers (bfloat16: the
    weight rounded to bfloat16)."""
    view = GraphView(model)
    weights: Dict[WeightKey, QuantizedWeight] = {}
    for use in plan.weights:
        key = weight_key(use, config.per_channel)
        if key not in weights:
            w = view.constant_value(key[0])
            if config.weight_type.is_float:
                weights[key] = QuantizedWeight(BFLOAT16_QPARAMS, round_to_bfloat16(w))
                continue
            qp = weight_qparams(w, config, key[1])
            weights[key] = QuantizedWeight(qp, quantize_array(w, qp, config.weight_type))
    return weights


def build_table(model: ModelProto, plan: QuantPlan, collectors: Mapping[str, TensorCollector],
                config: QuantConfig) -> QuantTable:
    """The table of a run. bfloat16 activations have no parameters (a Cast pair each)."""
    activations = {} if config.activation_type.is_float else \
        group_qparams(plan, collectors, config, unclipped_activations(model, config))
    return QuantTable(activations, nearest_weights(model, plan, config))


def unclipped_activations(model: ModelProto, config: QuantConfig) -> AbstractSet[str]:
    """The tensors that keep their whole range: at most config.unclipped_output_layers
    weighted layers from a model output (none when it is None) and more than
    config.clipped_input_layers from every model input (when that is set)."""
    if config.unclipped_output_layers is None:
        return frozenset()
    unclipped = {t for t, layers in layers_to_outputs(model).items() if layers <= config.unclipped_output_layers}
    if config.clipped_input_layers is not None:
        from_inputs = layers_from_inputs(model)  # a tensor no input reaches (constants) is far from them
        unclipped = {t for t in unclipped if t not in from_inputs or from_inputs[t] > config.clipped_input_layers}
    return frozenset(unclipped)


# A tensor summed into a per-token normalisation's input stays float when its bulk (the
# values up to this quantile of |x|) would be quantized at less than BULK_SQNR_MIN_DB. That
# is a tensor whose scale is set by a few outliers far beyond the rest: a "massive
# activation" channel of a BERT-like model (MiniLM's first FFN output: one channel near 200,
# the others below 6; XINT8's power-of-two step 2 rounds them to 0 or +-2, the bulk at
# -0.2 dB). The normalisation divides each row by its own spread, so the small channels
# carry the information and their error is what reaches the next layer. Measured (XINT8,
# benchmarks/real_models.py): the three such tensors of MiniLM sit at -0.2, -0.2 and 1.7 dB,
# the next-worst MiniLM tensor at 13.9 dB, EfficientNet-Lite0's worst at 35 dB. 1 % of the
# values: one channel in 100 (a model with a massive channel has hundreds of channels).
BULK_QUANTILE = 0.99
BULK_SQNR_MIN_DB = 10.0


def outlier_dominated(model: ModelProto, plan: QuantPlan, collectors: Mapping[str, TensorCollector],
                      activations: Mapping[str, QParams]) -> Dict[str, str]:
    """{tensor: reason} of the quantized tensors summed into a per-token normalisation
    (pyquant.graph.plan.normalized_sums) whose bulk the parameters ``activations`` quantize
    at less than BULK_SQNR_MIN_DB: they should stay float."""
    found: Dict[str, str] = {}
    for name, normalization in normalized_sums(model).items():
        qp = activations.get(name)
        collector = collectors.get(name)
        if qp is None or collector is None or name in plan.constant_activations:
            continue
        qtype = _integer_type(qp)
        db = bulk_sqnr_db(collector, qp, qtype, BULK_QUANTILE)
        if db < BULK_SQNR_MIN_DB:
            found[name] = (f"summed into normalisation {normalization}, its scale set by outliers "
                           f"(range [{collector.min:.3g}, {collector.max:.3g}]): {BULK_QUANTILE:.0%} of its values "
                           f"would be quantized at {db:.1f} dB (< {BULK_SQNR_MIN_DB:g} dB)")
    return found


def _integer_type(qp: QParams) -> QuantType:
    dtype = qp.zero_point.dtype
    return next(t for t in QuantType if not t.is_float and np.dtype(t.numpy_dtype) == dtype)


# A Concat under the NPU rules shares one scale between its inputs and its output. When one
# input's own values would be quantized at less than SHARED_SCALE_MIN_DB with that shared
# scale (its range is far below another input's), the Concat stays float instead: its inputs
# keep scales of their own. YOLOv8's output concatenates box coordinates (0 to 320) and class
# scores (0 to 1): one power-of-two step of 2 rounded every score to 0 (XINT8 detection F1
# 0.000 against the float model). Inputs of comparable range, as a feature-pyramid Concat's,
# lose a few dB at most.
SHARED_SCALE_MIN_DB = 10.0


def concat_starved(model: ModelProto, plan: QuantPlan, collectors: Mapping[str, TensorCollector],
                   activations: Mapping[str, QParams], config: QuantConfig) -> Dict[str, str]:
    """{Concat output: reason} of the Concats sharing one scale (NPU rules) that quantize
    one of their inputs at less than SHARED_SCALE_MIN_DB: their outputs should stay float."""
    if not config.enable_npu_cnn:
        return {}
    found: Dict[str, str] = {}
    view = GraphView(model)
    for node in model.graph.node:
        shared = activations.get(node.output[0]) if node.op_type == "Concat" and node.output else None
        if shared is None:
            continue
        for name in node.input:
            collector = collectors.get(name)
            if collector is None or activations.get(name) is not shared or name in plan.constant_activations:
                continue
            db = bulk_sqnr_db(collector, shared, _integer_type(shared), 1.0)
            if db < SHARED_SCALE_MIN_DB:
                found[node.output[0]] = (f"Concat {view.node_name(node)} left float: one shared scale "
                                         f"({float(shared.scale):.3g}) would quantize its input {name} (range "
                                         f"[{collector.min:.3g}, {collector.max:.3g}]) at {db:.1f} dB "
                                         f"(< {SHARED_SCALE_MIN_DB:g} dB)")
                break
    return found
