"""Fold BatchNormalization into the preceding Conv: y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta
becomes a Conv with W' = W * a (per output channel) and b' = (b - mean) * a + beta, a = gamma / sqrt(var + eps)."""
from __future__ import annotations

import logging

import numpy as np
from onnx import ModelProto

from .view import GraphView, attribute, drop_unused_initializers

log = logging.getLogger(__name__)


def fold_batch_norm(model: ModelProto) -> int:
    """Fold every Conv -> BatchNormalization pair in place; returns how many were folded."""
    view = GraphView(model)
    folded = 0
    for bn in list(model.graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) > 1 and any(bn.output[1:]):
            continue
        conv = view.producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or view.single_consumer(conv.output[0]) is not bn:
            continue
        params = [view.constant_value(n) for n in bn.input[1:5]]
        weight = view.constant_value(conv.input[1])
        if weight is None or any(p is None for p in params):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        a = gamma / np.sqrt(var + attribute(bn, "epsilon", 1e-5))
        bias = view.constant_value(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros_like(a)
        new_w = (weight.astype(np.float64) * a.reshape(-1, *([1] * (weight.ndim - 1)))).astype(np.float32)
        new_b = ((bias.astype(np.float64) - mean) * a + beta).astype(np.float32)
        w_name = f"{conv.input[1]}_bnfold"
        b_name = f"{conv.output[0]}_bias_bnfold"
        view.replace_initializer(w_name, new_w)
        view.replace_initializer(b_name, new_b)
        conv.input[1] = w_name
        if len(conv.input) > 2:
            conv.input[2] = b_name
        else:
            conv.input.append(b_name)
        conv.output[0] = bn.output[0]
        model.graph.node.remove(bn)
        view.refresh()
        folded += 1
    if folded:
        drop_unused_initializers(model)
        log.info("folded %d BatchNormalization nodes into Conv", folded)
    return folded
