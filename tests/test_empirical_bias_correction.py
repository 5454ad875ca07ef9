"""Empirical bias correction (pyquant.techniques.empirical_bias_correction)."""
import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyquant.config import QuantConfig, get_preset
from pyquant.data import ArrayReader
from pyquant.errors import ConfigError
from pyquant.pipeline import quantize_model

# The corrected layer's mean output must land within this fraction of the uncorrected
# model's mean error (measured: about 0.1; without the technique it is 1 by definition).
MEAN_ERROR_RATIO = 0.35
BIAS_ATOL = 1e-4  # float32 sums over 32 x 8 x 8 positions, then an int32 bias step


def silu_model(rng: np.random.Generator):
    """Conv 3x3 -> SiLU (Sigmoid, Mul) -> Conv 1x1: the SiLU output's negative lobe
    (-0.28..0) gets few uint8 steps against its long positive tail."""
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    w2 = (rng.standard_normal((5, 8, 1, 1)) * 0.5).astype(np.float32)
    b2 = rng.standard_normal(5).astype(np.float32) * 0.1
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c1"], ["s1"]), helper.make_node("Mul", ["c1", "s1"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2", "b2"], ["y"])]
    inits = [numpy_helper.from_array(v, n) for n, v in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))]
    graph = helper.make_graph(nodes, "silu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def calibration(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((32, 4, 8, 8)).astype(np.float32)
    x[0, :, 0, 0] = 40.0  # one outlier stretches the ranges: coarse steps everywhere
    return x


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("preset,per_channel", [("U8S8", True), ("U8S8", False), ("XINT8", False)])
def test_removes_the_mean_shift_of_activation_quantization(preset, per_channel):
    rng = np.random.default_rng(7)
    model, x = silu_model(rng), calibration(rng)
    reference = run(model, x).mean(axis=(0, 2, 3))
    errors = {}
    for passes in (0, 1):
        config = dataclasses.replace(get_preset(preset), per_channel=per_channel, empirical_bias_correction=passes)
        q = quantize_model(model, ArrayReader(x, "x", 8), config).model
        errors[passes] = np.abs(run(q, x).mean(axis=(0, 2, 3)) - reference).mean()
    assert errors[1] < MEAN_ERROR_RATIO * errors[0], errors


def _initializer(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _dequantized(model, dq_output):
    """A DequantizeLinear output of constant inputs, computed in numpy."""
    node = next(n for n in model.graph.node if n.output[0] == dq_output)
    q, scale = _initializer(model, node.input[0]), _initializer(model, node.input[1])
    zero = _initializer(model, node.input[2]) if len(node.input) > 2 else np.zeros_like(scale)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    shape = [1] * q.ndim
    if scale.ndim:
        shape[axis] = -1
    return (q.astype(np.float64) - zero.reshape(shape)) * scale.reshape(shape).astype(np.float64)


def test_bias_equals_the_numpy_reference():
    """One Conv on a quantized input: b = b_float + W E[x] - W_q E[QDQ(x)], with W_q and
    the input's scale and zero point read from the written model."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((6, 3, 1, 1)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"])], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 8, 8])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = (rng.exponential(1.0, (32, 3, 8, 8)) - 0.3).astype(np.float32)
    config = dataclasses.replace(get_preset("U8S8"), per_channel=True, empirical_bias_correction=1)
    q = quantize_model(model, ArrayReader(x, "x", 8), config).model
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    w_q = _dequantized(q, conv.input[1])
    bias = _dequantized(q, conv.input[2])
    quantize = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    scale, zero = float(_initializer(q, quantize.input[1])), float(_initializer(q, quantize.input[2]))
    x_q = (np.clip(np.round(x.astype(np.float64) / scale) + zero, 0, 255) - zero) * scale  # round half even
    expected = b + w[:, :, 0, 0].astype(np.float64) @ x.mean(axis=(0, 2, 3), dtype=np.float64) \
        - w_q[:, :, 0, 0] @ x_q.mean(axis=(0, 2, 3))
    step = scale * np.abs(_initializer(q, next(n for n in q.graph.node if n.output[0] == conv.input[1]).input[1]))
    np.testing.assert_allclose(bias, expected, atol=BIAS_ATOL + step.max() / 2)
    assert not np.allclose(bias, b, atol=step.max()), "the correction moved nothing: the test shows nothing"


def test_a_layer_without_bias_gains_one_and_further_passes_converge():
    rng = np.random.default_rng(5)
    model = silu_model(rng)
    conv = model.graph.node[3]
    del conv.input[2]
    x = calibration(rng)
    config = dataclasses.replace(get_preset("U8S8"), per_channel=True, empirical_bias_correction=3)
    result = quantize_model(model, ArrayReader(x, "x", 8), config)
    steps = result.reports["empirical_bias_correction"].mean_bias_step
    assert len(steps) == 3 and steps[2] < steps[0], steps
    last = [n for n in result.model.graph.node if n.op_type == "Conv"][-1]
    assert len(last.input) == 3 and last.input[2]


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_passes_must_be_a_non_negative_integer(value):
    with pytest.raises(ConfigError, match="empirical_bias_correction"):
        QuantConfig(empirical_bias_correction=value)


def test_needs_a_reader_that_rewinds():
    rng = np.random.default_rng(1)
    model, x = silu_model(rng), calibration(rng)

    class Once:
        def __init__(self):
            self.batches = [{"x": x[i:i + 8]} for i in range(0, len(x), 8)]

        def get_next(self):
            return self.batches.pop(0) if self.batches else None

    with pytest.raises(Exception, match="rewind"):
        quantize_model(model, Once(), dataclasses.replace(get_preset("U8S8"), empirical_bias_correction=1))


@pytest.mark.parametrize("preset", ["U8S8", "XINT8"])  # the first layer's output: float / quantized graph output
def test_a_layer_output_that_is_also_a_model_output(preset):
    rng = np.random.default_rng(2)
    model = silu_model(rng)
    model.graph.output.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, ["N", 8, 8, 8]))
    x = calibration(rng)
    config = dataclasses.replace(get_preset(preset), empirical_bias_correction=1)
    result = quantize_model(model, ArrayReader(x, "x", 8), config)
    assert result.reports["empirical_bias_correction"].layers == 2
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["y", "c1"]
