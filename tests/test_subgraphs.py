"""If bodies are quantized by the main graph's rules with the calibration of the branch
the data takes (pyquant.graph.subgraphs); the other branch stays float; the If outputs,
and what reaches them unchanged (a recurrent state), stay float. (Loop and Scan bodies:
tests/test_loops.py.)"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import pyquant
from pyquant.api import quantize_detailed
from pyquant.config import QuantType, get_preset
from pyquant.errors import CalibrationError
from pyquant.graph.subgraphs import flatten_taken_branches, fold_branches

RNG = np.random.default_rng(0)


def const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def conv_branch(name: str, weight: str, nested: bool) -> onnx.GraphProto:
    """Conv -> Relu -> [nested If on the same condition: Conv or Identity] -> (y, new state)."""
    nodes = [helper.make_node("Conv", ["x", weight], [f"{name}_c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"])]
    inner_in = f"{name}_r"
    if nested:
        inner_then = helper.make_graph(
            [helper.make_node("Conv", [inner_in, "w_inner"], [f"{name}_inner_c"], pads=[1, 1, 1, 1])],
            f"{name}_inner_then", [], [helper.make_tensor_value_info(f"{name}_inner_c", TensorProto.FLOAT, None)])
        inner_else = helper.make_graph(
            [helper.make_node("Identity", [inner_in], [f"{name}_inner_id"])],
            f"{name}_inner_else", [], [helper.make_tensor_value_info(f"{name}_inner_id", TensorProto.FLOAT, None)])
        nodes.append(helper.make_node("If", ["is16k"], [f"{name}_inner"], name=f"{name}_inner_if",
                                      then_branch=inner_then, else_branch=inner_else))
        inner_in = f"{name}_inner"
    nodes += [helper.make_node("GlobalAveragePool", [inner_in], [f"{name}_pool"]),
              helper.make_node("Flatten", [f"{name}_pool"], [f"{name}_flat"]),
              helper.make_node("Gemm", [f"{name}_flat", "w_head"], [f"{name}_logit"], transB=1),
              helper.make_node("Sigmoid", [f"{name}_logit"], [f"{name}_y"]),
              # the recurrent state: the state plus the layer's pooled output, carried out unchanged
              helper.make_node("Add", ["state", f"{name}_flat"], [f"{name}_sum"]),
              helper.make_node("Reshape", [f"{name}_sum", "state_shape"], [f"{name}_state"])]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None),
                                               helper.make_tensor_value_info(f"{name}_state", TensorProto.FLOAT, None)])


def vad_like(nested: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(1)  # the same weights on every call
    init = [const("w16k", rng.normal(size=(4, 2, 3, 3)) * 0.5), const("w8k", rng.normal(size=(4, 2, 3, 3)) * 0.5),
            const("w_inner", rng.normal(size=(4, 4, 3, 3)) * 0.3), const("w_head", rng.normal(size=(1, 4))),
            numpy_helper.from_array(np.array([1, 4], np.int64), "state_shape"),
            numpy_helper.from_array(np.array(16000, np.int64), "sr16k")]
    nodes = [helper.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["y", "state_out"], name="rate_if",
                              then_branch=conv_branch("then", "w16k", nested),
                              else_branch=conv_branch("else", "w8k", False))]
    graph = helper.make_graph(nodes, "vad_like", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, 4]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1]),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, 4])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def feeds(n: int, rate: int = 16000):
    return [{"x": RNG.normal(size=(1, 2, 8, 8)).astype(np.float32), "state": RNG.normal(size=(1, 4)).astype(np.float32),
             "sr": np.array(rate, np.int64)} for _ in range(n)]


def run(model: onnx.ModelProto, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def ops(graph: onnx.GraphProto):
    return [n.op_type for n in graph.node]


def branch(model: onnx.ModelProto, node: str, which: str) -> onnx.GraphProto:
    n = next(n for n in model.graph.node if n.name == node)
    return next(a.g for a in n.attribute if a.name == which)


def test_flatten_then_fold_is_the_same_model_and_nested_ifs_are_inlined():
    model = vad_like()
    flat, inlined, left = flatten_taken_branches(model, feeds(1)[0])
    assert [b.name for b in inlined] == ["rate_if", "then_inner_if"] and not left
    assert "If" not in ops(flat.graph)
    folded = fold_branches(flat, inlined)
    onnx.checker.check_model(folded)
    for f in feeds(2) + feeds(2, 8000):
        for a, b in zip(run(model, f), run(folded, f)):
            np.testing.assert_array_equal(a, b)


def test_the_taken_branch_is_quantized_the_other_stays_float():
    model = vad_like()
    result = quantize_detailed(model, feeds(16), get_preset("U8S8"))
    q = result.model
    onnx.checker.check_model(q)
    assert ops(q.graph).count("If") == 1
    then = branch(q, "rate_if", "then_branch")
    assert "QuantizeLinear" in ops(then) and "DequantizeLinear" in ops(then)
    inner = next(n for n in then.node if n.op_type == "If")  # the nested If is back, quantized inside
    assert "QuantizeLinear" in ops(next(a.g for a in inner.attribute if a.name == "then_branch"))
    assert branch(q, "rate_if", "else_branch") == branch(model, "rate_if", "else_branch")
    for f in feeds(4):
        for a, b in zip(run(model, f), run(q, f)):
            assert np.abs(a - b).max() <= 0.05 * np.abs(a).max() + 1e-3
    for f in feeds(2, 8000):  # the untaken branch computes as before
        for a, b in zip(run(model, f), run(q, f)):
            np.testing.assert_array_equal(a, b)
    assert "If branches inlined for calibration: 2" in result.reports["preparation"].summary()


def test_the_state_carried_to_an_if_output_stays_float():
    q = quantize_detailed(vad_like(nested=False), feeds(16), get_preset("U8S8")).model
    quantized = {n.input[0] for g in (q.graph, branch(q, "rate_if", "then_branch")) for n in g.node
                 if n.op_type == "QuantizeLinear"}
    assert "then_sum" not in quantized and "then_state" not in quantized  # the Add's output, reshaped out
    assert "then_r" in quantized  # inside the branch, quantized as usual
    f = feeds(1)[0]
    np.testing.assert_allclose(run(q, f)[1], run(vad_like(nested=False), f)[1], rtol=0.05, atol=0.05)


def test_data_taking_both_branches_is_a_clear_error_or_the_if_is_excluded():
    data = feeds(4) + feeds(2, 8000)
    with pytest.raises(CalibrationError, match="If node 'rate_if' takes its else_branch in calibration batch 4.*"
                                               "nodes_to_exclude=\\['rate_if'\\]"):
        pyquant.quantize(vad_like(), data, "U8S8")
    result = quantize_detailed(vad_like(), data, dataclasses.replace(get_preset("U8S8"), nodes_to_exclude={"rate_if"}))
    assert result.report.float_nodes["rate_if"] == "excluded by the configuration"


def test_the_state_carried_to_an_if_output_is_quantized_when_tensor_types_names_it():
    model = vad_like(nested=False)
    state = {"then_sum": QuantType.QInt8, "then_state": QuantType.QInt8, "state_out": QuantType.QInt8}
    q = quantize_detailed(model, feeds(16), dataclasses.replace(get_preset("XINT8"), tensor_types=state)).model
    onnx.checker.check_model(q, full_check=True)
    quantized = {n.input[0] for n in branch(q, "rate_if", "then_branch").node if n.op_type == "QuantizeLinear"}
    assert {"then_sum", "then_state", "state_out_float"} <= quantized  # (a graph output's producer writes _float)
    f = feeds(1)[0]
    np.testing.assert_allclose(run(q, f)[1], run(model, f)[1], rtol=0.05, atol=0.05)
    for f in feeds(2, 8000):  # the untaken branch computes as before
        for a, b in zip(run(model, f), run(q, f)):
            np.testing.assert_array_equal(a, b)
