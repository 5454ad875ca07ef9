"""Build the table of quantization parameters (pyquant.qparams.QuantTable) once, after
calibration: activations from their statistics (one QParams per scale-sharing group),
weights from the model's weights with nearest rounding."""
from __future__ import annotations

import dataclasses
from typing import Dict, Mapping

from onnx import ModelProto

from ..config import QuantConfig
from ..errors import ConfigError
from ..graph.plan import QuantPlan
from ..graph.view import GraphView
from ..qparams import (BFLOAT16_QPARAMS, QParams, QuantizedWeight, QuantTable, WeightKey, quantize_array,
                       round_to_bfloat16, weight_key)
from .collector import TensorCollector
from .methods import activation_qparams, weight_qparams


def group_qparams(plan: QuantPlan, collectors: Mapping[str, TensorCollector],
                  config: QuantConfig) -> Dict[str, QParams]:
    """One QParams per scale-sharing group, computed from the group's merged statistics."""
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
        qp = activation_qparams(merged, group_config)
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
    activations = {} if config.activation_type.is_float else group_qparams(plan, collectors, config)
    return QuantTable(activations, nearest_weights(model, plan, config))
