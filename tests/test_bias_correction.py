"""Bias correction of weight rounding (pyquant.techniques.bias_correction)."""
import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyquant.config import get_preset
from pyquant.data import ArrayReader
from pyquant.pipeline import quantize_model
from pyquant.techniques.bias_correction import output_shift


def conv_model(weight, bias=None, group=1):
    inits = [numpy_helper.from_array(weight.astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
        inputs.append("b")
    c_in = weight.shape[1] * group
    graph = helper.make_graph(
        [helper.make_node("Conv", inputs, ["y"], group=group, pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", weight.shape[0], 12, 12])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("group,c_in,c_out", [(1, 3, 5), (4, 8, 8), (8, 8, 8), (2, 4, 6)])
def test_output_shift_equals_convolving_a_constant_image(group, c_in, c_out):
    rng = np.random.default_rng(group)
    error = rng.standard_normal((c_out, c_in // group, 3, 3))
    mean = rng.standard_normal(c_in)
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group)
    shift = output_shift(node, error, mean)
    image = np.broadcast_to(mean[None, :, None, None], (1, c_in, 12, 12)).astype(np.float32)
    brute = run(conv_model(error, group=group), image)[0, :, 6, 6]  # an interior position: no padding involved
    np.testing.assert_allclose(shift, brute, rtol=1e-4, atol=1e-4)


def test_gemm_shift_for_both_weight_layouts():
    rng = np.random.default_rng(0)
    error, mean = rng.standard_normal((4, 6)), rng.standard_normal(6)  # [N, K]
    trans = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    plain = helper.make_node("Gemm", ["x", "w"], ["y"])
    np.testing.assert_allclose(output_shift(trans, error, mean), error @ mean)
    np.testing.assert_allclose(output_shift(plain, error.T, mean), error @ mean)


@pytest.mark.parametrize("preset,group", [("XINT8", 8), ("XINT8", 1), ("U8S8", 8)])
def test_bias_correction_reduces_mean_output_error(preset, group):
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((8, 8 // group, 3, 3)) * rng.uniform(0.01, 1.0, (8, 1, 1, 1))
    model = conv_model(weight, rng.standard_normal(8) * 0.1, group)
    x = (rng.uniform(0, 1, (64, 8, 12, 12)) + rng.uniform(0, 2, (1, 8, 1, 1))).astype(np.float32)
    reference = run(model, x)
    errors = {}
    for correct in (False, True):
        cfg = dataclasses.replace(get_preset(preset), bias_correction=correct)
        q = quantize_model(model, ArrayReader(x, "x", 16), cfg).model
        diff = run(q, x) - reference
        errors[correct] = np.abs(diff[:, :, 1:-1, 1:-1].mean(axis=(0, 2, 3))).mean()  # interior
    assert errors[True] < 0.5 * errors[False], errors


def test_layer_without_bias_gets_one():
    rng = np.random.default_rng(4)
    model = conv_model(rng.standard_normal((4, 3, 3, 3)))
    x = rng.uniform(0, 1, (16, 3, 12, 12)).astype(np.float32)
    q = quantize_model(model, ArrayReader(x, "x", 8), get_preset("XINT8")).model
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3 and conv.input[2]
    onnx.checker.check_model(q)


def test_layers_sharing_one_bias_initializer_get_a_corrected_bias_each():
    """Two convolutions reading one bias initializer: each correction is its own (writing
    one shared corrected initializer would give the first layer the second's)."""
    rng = np.random.default_rng(6)
    w1, w2 = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal((4, 3, 3, 3)) * 0.05
    inits = [numpy_helper.from_array(w1.astype(np.float32), "w1"), numpy_helper.from_array(w2.astype(np.float32), "w2"),
             numpy_helper.from_array(np.full(4, 0.1, np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b"], ["y1"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2", "b"], ["y2"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4, 12, 12]) for n in ("y1", "y2")],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = (rng.uniform(0, 1, (16, 3, 12, 12)) + 1).astype(np.float32)
    q = quantize_model(model, ArrayReader(x, "x", 8), get_preset("U8S8")).model
    init = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    producer = {n.output[0]: n for n in q.graph.node}

    def bias(conv):  # the dequantized int32 bias (zero point 0)
        dq = producer[conv.input[2]]
        return init[dq.input[0]] * init[dq.input[1]]

    first, second = [n for n in q.graph.node if n.op_type == "Conv"]
    assert not np.allclose(bias(first), bias(second), atol=1e-3), (bias(first), bias(second))
