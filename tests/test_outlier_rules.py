"""Rules for tensors whose calibrated range is set by a few outliers (pyquant.calibrate.table).

Tiny generated models: a feed-forward block whose down projection writes one "massive"
channel, summed into a LayerNormalization as in a BERT-like encoder."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyquant.api import quantize_detailed
from pyquant.calibrate import table
from pyquant.config import QuantType, get_preset
from pyquant.graph import plan as plan_module
from pyquant.graph.plan import normalized_sums

CHANNELS = 128  # the massive channel is 1/128 of the values: outside the rule's 99 % bulk
TOKENS = 6
MASSIVE = 200.0  # the outlier channel's typical value; the others are about 1


def ffn_block(massive: float = MASSIVE, written_out: bool = False) -> onnx.ModelProto:
    """x [1, TOKENS, CHANNELS] -> MatMul -> Add bias -> Add x -> normalisation -> MatMul.
    The bias puts ``massive`` into channel 0 of every token (a massive activation)."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((CHANNELS, CHANNELS)) / np.sqrt(CHANNELS)).astype(np.float32)
    bias = np.zeros(CHANNELS, np.float32)
    bias[0] = massive
    gamma = np.ones(CHANNELS, np.float32)
    gamma[0] = 0.01  # as in trained models: the normalised massive channel is scaled down
    w2 = (rng.standard_normal((CHANNELS, CHANNELS)) / np.sqrt(CHANNELS)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(bias, "bias"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(gamma, "gamma"),
             numpy_helper.from_array(np.zeros(CHANNELS, np.float32), "beta")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="down"),
             helper.make_node("Add", ["h", "bias"], ["hb"], name="bias_add"),
             helper.make_node("Add", ["hb", "x"], ["s"], name="residual")]
    if written_out:  # (s - mean) / sqrt(var + eps), as tf2onnx writes a LayerNorm
        inits.append(numpy_helper.from_array(np.array(1e-5, np.float32), "eps"))
        nodes += [helper.make_node("ReduceMean", ["s"], ["mean"], axes=[-1], name="mean"),
                  helper.make_node("Sub", ["s", "mean"], ["centered"], name="center"),
                  helper.make_node("Mul", ["centered", "centered"], ["squared"], name="square"),
                  helper.make_node("ReduceMean", ["squared"], ["var"], axes=[-1], name="var"),
                  helper.make_node("Add", ["var", "eps"], ["var_eps"], name="var_eps"),
                  helper.make_node("Sqrt", ["var_eps"], ["std"], name="std"),
                  helper.make_node("Div", ["centered", "std"], ["n"], name="normalize")]
    else:
        nodes.append(helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["n"], axis=-1, name="ln"))
    nodes.append(helper.make_node("MatMul", ["n", "w2"], ["y"], name="up"))
    shape = [1, TOKENS, CHANNELS]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    opset = 13 if written_out else 17
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def feeds(count: int, seed: int):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, TOKENS, CHANNELS)).astype(np.float32)} for _ in range(count)]


def sqnr_to_float(model, quantized) -> float:
    run = lambda m, f: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, f)[0]
    ref = np.concatenate([run(model, f) for f in feeds(8, 1)])
    test = np.concatenate([run(quantized, f) for f in feeds(8, 1)])
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - test) ** 2)))


SUMMED = {"hb", "s"}  # the sums that carry the massive channel (h does not)


@pytest.mark.parametrize("written_out", [False, True])
def test_normalized_sums_follow_bias_and_residual_additions(written_out):
    found = normalized_sums(ffn_block(written_out=written_out))
    assert set(found) == SUMMED | {"h", "x"}
    assert set(found.values()) == {"mean" if written_out else "ln"}


def test_a_massive_channel_summed_into_layernorm_stays_float_under_xint8(monkeypatch):
    model = ffn_block()
    result = quantize_detailed(model, feeds(8, 0), "XINT8")
    assert SUMMED <= set(result.plan.float_tensors)
    assert all("outliers" in result.plan.float_tensors[t] for t in SUMMED)
    assert SUMMED.isdisjoint(result.plan.activations)
    assert {"x", "h"} <= set(result.plan.activations)  # summed into the norm, but without outliers
    with_rule = sqnr_to_float(model, result.model)
    monkeypatch.setattr(table, "BULK_SQNR_MIN_DB", -np.inf)  # the rule off
    without = quantize_detailed(model, feeds(8, 0), "XINT8")
    assert SUMMED <= set(without.plan.activations)
    # power-of-two step 2 for the sums: the unit-sized channels round to 0 or +-2
    assert with_rule > sqnr_to_float(model, without.model) + 10


def test_a_written_out_layernorm_is_a_normalisation_too():
    result = quantize_detailed(ffn_block(written_out=True), feeds(8, 0), "XINT8")
    assert SUMMED <= set(result.plan.float_tensors)


def test_without_outliers_the_sums_stay_quantized():
    result = quantize_detailed(ffn_block(massive=3.0), feeds(8, 0), "XINT8")
    assert SUMMED <= set(result.plan.activations)
    assert not any("outliers" in reason for reason in result.plan.float_tensors.values())


def variance_layernorm(offset: float = 10.0, pooled_matmul: bool = False) -> onnx.ModelProto:
    """h = x W + offset, normalised as tf2onnx writes a LayerNorm: var = E[h^2] - E[h]^2,
    (h - E[h]) / sqrt(max(var, 0) + eps), then a MatMul. With ``pooled_matmul`` the mean
    feeds a MatMul instead (a pooled feature, not a normalisation)."""
    rng = np.random.default_rng(0)
    c = 16
    w = (rng.standard_normal((c, c)) / np.sqrt(c)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(c, offset, np.float32), "offset"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1.0 / c, np.float32), "inv_n"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h0"]), helper.make_node("Add", ["h0", "offset"], ["h"]),
             helper.make_node("ReduceSum", ["h", "axes"], ["sum"]), helper.make_node("Mul", ["sum", "inv_n"], ["mean"])]
    if pooled_matmul:
        inits.append(numpy_helper.from_array(w[:1], "w_pool"))  # [.., 1] -> [.., c]
        nodes.append(helper.make_node("MatMul", ["mean", "w_pool"], ["y"]))
    else:
        nodes += [helper.make_node("Mul", ["h", "h"], ["square"]),
                  helper.make_node("ReduceSum", ["square", "axes"], ["sum_sq"]),
                  helper.make_node("Mul", ["sum_sq", "inv_n"], ["mean_sq"]),
                  helper.make_node("Mul", ["mean", "mean"], ["mean_squared"]),
                  helper.make_node("Sub", ["mean_sq", "mean_squared"], ["var"]),
                  helper.make_node("Max", ["zero", "var"], ["var_pos"]),
                  helper.make_node("Add", ["var_pos", "eps"], ["var_eps"]),
                  helper.make_node("Sqrt", ["var_eps"], ["std"]),
                  helper.make_node("Reciprocal", ["std"], ["inv_std"]),
                  helper.make_node("Sub", ["h", "mean"], ["centered"]),
                  helper.make_node("Mul", ["centered", "inv_std"], ["n"]),
                  helper.make_node("MatMul", ["n", "w"], ["y"])]
    shape = [1, TOKENS, c]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


STATISTICS = {"sum", "mean", "square", "sum_sq", "mean_sq", "mean_squared", "var", "var_pos", "var_eps", "std",
              "inv_std"}


def test_a_written_out_layernorms_statistics_stay_float_under_xint8(monkeypatch):
    model = variance_layernorm()
    feed_list = [{"x": f["x"][..., :16]} for f in feeds(8, 0)]
    result = quantize_detailed(model, feed_list, "XINT8")
    assert STATISTICS <= set(result.plan.float_tensors)
    assert all("statistic of a written-out normalisation" in result.plan.float_tensors[t]
               for t in STATISTICS - {"std"})  # std is a divisor first (its own reason)
    assert {"h", "centered", "n"} <= set(result.plan.activations)  # the data path stays quantized
    run = lambda m: np.concatenate([ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                                    .run(None, f)[0] for f in feed_list])
    ref = run(model)
    sqnr = lambda q: float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - run(q)) ** 2)))
    monkeypatch.setattr(plan_module, "_normalization_statistics", lambda view, m: {})  # the rule off
    without = quantize_detailed(model, feed_list, "XINT8")
    assert "mean_sq" in without.plan.activations
    # E[h^2] ~ 100 and E[h]^2 ~ 100 at 8 bits each: their difference (~1) is mostly rounding
    assert sqnr(result.model) > sqnr(without.model) + 10


def test_a_mean_pooled_into_a_matmul_is_not_a_normalisation():
    result = quantize_detailed(variance_layernorm(pooled_matmul=True), [{"x": f["x"][..., :16]} for f in feeds(4, 0)],
                               "XINT8")
    assert "sum" in result.plan.activations  # (preparation folds the 1/n into the MatMul)
    assert not any("normalisation" in reason for reason in result.plan.float_tensors.values())


def boxes_and_scores(box_scale: float) -> onnx.ModelProto:
    """Concat(x W * box_scale, sigmoid(x V)) as a detector's output (boxes next to scores)."""
    rng = np.random.default_rng(0)
    c = 16
    inits = [numpy_helper.from_array((rng.standard_normal((c, 4)) * box_scale / np.sqrt(c)).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal((c, 8)) / np.sqrt(c)).astype(np.float32), "v")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["boxes"]), helper.make_node("MatMul", ["x", "v"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["scores"]),
             helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=-1, name="head")]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, c])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_concat_whose_shared_scale_would_zero_an_input_stays_float_under_xint8(monkeypatch):
    model = boxes_and_scores(box_scale=300.0)
    feed_list = [{"x": f["x"][..., :16]} for f in feeds(8, 0)]
    result = quantize_detailed(model, feed_list, "XINT8")
    assert "y" in result.plan.float_tensors and "head" in result.plan.float_tensors["y"]
    table_ = result.table.activations
    assert float(table_["scores"].scale) < float(table_["boxes"].scale) / 64  # scales of their own
    run = lambda m: np.concatenate([ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                                    .run(None, f)[0][..., 4:] for f in feed_list])
    ref = run(model)
    error = lambda q: float(np.max(np.abs(run(q) - ref)))
    monkeypatch.setattr(table, "SHARED_SCALE_MIN_DB", -np.inf)  # the rule off
    without = quantize_detailed(model, feed_list, "XINT8")
    assert without.table.activations["scores"] is without.table.activations["y"]
    assert error(result.model) < 0.02 < 0.3 < error(without.model)  # scores rounded to 0 without the rule


def test_a_concat_of_comparable_ranges_keeps_one_shared_scale():
    result = quantize_detailed(boxes_and_scores(box_scale=1.0), [{"x": f["x"][..., :16]} for f in feeds(4, 0)],
                               "XINT8")
    assert "y" in result.plan.activations
    assert result.table.activations["scores"] is result.table.activations["y"]


def test_a_tensor_given_a_type_by_the_user_keeps_it():
    config = dataclasses.replace(get_preset("XINT8"), tensor_types={"hb": QuantType.QUInt8})
    result = quantize_detailed(ffn_block(), feeds(8, 0), config)
    assert "hb" in result.plan.activations and "s" in result.plan.float_tensors
