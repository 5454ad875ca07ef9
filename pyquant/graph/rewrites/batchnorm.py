"""BatchNormalization into a neighbouring Conv.

After a Conv: y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta becomes a Conv with
W' = W * a (per output channel) and b' = (b - mean) * a + beta, a = gamma / sqrt(var + eps).

Elsewhere (after an Add, a Concat, a graph input) and read only by a Conv/Gemm:
BN(x) = x * a + (beta - mean * a) per channel, written as Mul and Add, which
pyquant.graph.rewrites.affine then folds into the layer that reads it."""
from __future__ import annotations

import logging

import numpy as np
from onnx import ModelProto, helper

from ..view import GraphView, attribute, drop_unused_initializers

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


def unfold_batch_norm_before_layers(model: ModelProto) -> int:
    """Rewrite each BatchNormalization whose only reader is a Conv without padding (or a
    Gemm/MatMul) as Mul -> Add with per-channel constants, ready for the affine fold."""
    view = GraphView(model)
    unfolded = 0
    for bn in list(model.graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) > 1 and any(bn.output[1:]):
            continue
        reader = view.single_consumer(bn.output[0])
        if reader is None or reader.input[0] != bn.output[0] or not _foldable_reader(view, reader):
            continue
        params = [view.constant_value(n) for n in bn.input[1:5]]
        if any(p is None for p in params):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        a = gamma / np.sqrt(var + attribute(bn, "epsilon", 1e-5))
        rank = _reader_input_rank(view, reader)
        shape = (-1,) + (1,) * (rank - 2) if rank > 2 else (-1,)
        base = bn.output[0]
        view.replace_initializer(f"{base}_bn_scale", a.reshape(shape).astype(np.float32))
        view.replace_initializer(f"{base}_bn_shift", (beta - mean * a).reshape(shape).astype(np.float32))
        mul = helper.make_node("Mul", [bn.input[0], f"{base}_bn_scale"], [f"{base}_bn_scaled"], name=f"{base}_bn_mul")
        add = helper.make_node("Add", [f"{base}_bn_scaled", f"{base}_bn_shift"], [base], name=f"{base}_bn_add")
        index = list(model.graph.node).index(bn)
        model.graph.node.remove(bn)
        model.graph.node.insert(index, add)
        model.graph.node.insert(index, mul)
        view.refresh()
        unfolded += 1
    if unfolded:
        drop_unused_initializers(model)
    return unfolded


def _foldable_reader(view: GraphView, node) -> bool:
    if node.op_type == "Conv":
        pads = attribute(node, "pads", []) or []
        auto = attribute(node, "auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        return not any(pads) and auto in ("NOTSET", "VALID") and view.is_constant(node.input[1])
    if node.op_type == "Gemm":
        return not attribute(node, "transA", 0) and view.is_constant(node.input[1])
    return False


def _reader_input_rank(view: GraphView, node) -> int:
    if node.op_type == "Conv":
        return view.constant_value(node.input[1]).ndim
    return 2
