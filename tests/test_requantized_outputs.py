"""graph.qdq.with_requantized_layer_outputs: the inference twin of a QDQ model that
onnxruntime runs with integer convolutions must compute the same bits as the model."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyquant.graph.qdq import with_requantized_layer_outputs

C_IN, C_OUT = 4, 6


def qdq_conv_model(chain, scales=(2.0 ** -4, 2.0 ** -7, 2.0 ** -5), extra_consumer=False, seed=0):
    """x -> Q/DQ -> Conv (int8 weight and int32 bias behind DQ) -> chain -> Q/DQ -> y.

    ``chain``: list of (op_type, constant inputs as arrays or None, attributes)."""
    rng = np.random.default_rng(seed)
    s_in, s_w, s_out = scales
    w = rng.integers(-127, 128, size=(C_OUT, C_IN, 3, 3)).astype(np.int8)
    bias = rng.integers(-2000, 2000, size=C_OUT).astype(np.int32)
    inits = [
        numpy_helper.from_array(np.float32(s_in), "s_in"), numpy_helper.from_array(np.uint8(128), "z_in"),
        numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.float32(s_w), "s_w"),
        numpy_helper.from_array(np.int8(0), "z_w"),
        numpy_helper.from_array(bias, "b_q"), numpy_helper.from_array(np.float32(s_in * s_w), "s_b"),
        numpy_helper.from_array(np.int32(0), "z_b"),
        numpy_helper.from_array(np.float32(s_out), "s_out"), numpy_helper.from_array(np.uint8(0), "z_out"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s_in", "z_in"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "s_in", "z_in"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "s_w", "z_w"], ["w_dq"]),
        helper.make_node("DequantizeLinear", ["b_q", "s_b", "z_b"], ["b_dq"]),
        helper.make_node("Conv", ["x_dq", "w_dq", "b_dq"], ["conv"], pads=[1, 1, 1, 1]),
    ]
    source = "conv"
    for i, (op, constants, attrs) in enumerate(chain):
        inputs = [source]
        for j, value in enumerate(constants or []):
            if value is None:
                inputs.append("")
                continue
            name = f"c{i}_{j}"
            inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
            inputs.append(name)
        nodes.append(helper.make_node(op, inputs, [f"t{i}"], **attrs))
        source = f"t{i}"
    nodes += [helper.make_node("QuantizeLinear", [source, "s_out", "z_out"], ["y_q"]),
              helper.make_node("DequantizeLinear", ["y_q", "s_out", "z_out"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, C_OUT, 8, 8])]
    if extra_consumer:
        nodes.append(helper.make_node("Neg", ["conv"], ["conv_neg"]))
        outputs.append(helper.make_tensor_value_info("conv_neg", TensorProto.FLOAT, [None, C_OUT, 8, 8]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, C_IN, 8, 8])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def run(model, x, optimized_path=None):
    options = ort.SessionOptions()
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def inputs(seed=1):
    rng = np.random.default_rng(seed)
    # wide enough that the convolution's outputs cross both clamp bounds and saturate uint8
    return [rng.uniform(-8, 8, size=(2, C_IN, 8, 8)).astype(np.float32),
            (rng.integers(-128, 128, size=(2, C_IN, 8, 8)) * 2.0 ** -4).astype(np.float32)]


PER_CHANNEL_BOUND = (np.arange(1, C_OUT + 1) * 0.7).reshape(1, C_OUT, 1, 1)  # not on the grid

CLAMP_CHAINS = {
    "relu6 (Clip)": [("Clip", [0.0, 6.0], {})],
    "Clip without max": [("Clip", [0.5, None], {})],
    "Relu then per-channel Min (CLE)": [("Relu", [], {}), ("Min", [PER_CHANNEL_BOUND], {})],
    "Max then Min": [("Max", [-0.3], {}), ("Min", [3.3], {})],
}


@pytest.mark.parametrize("chain", CLAMP_CHAINS.values(), ids=CLAMP_CHAINS.keys())
def test_clamp_chains_get_a_pair_and_keep_every_bit(chain, tmp_path):
    model = qdq_conv_model(chain)
    twin, added = with_requantized_layer_outputs(model)
    assert added == 1
    onnx.checker.check_model(twin)
    for x in inputs():
        want, got = run(model, x)[0], run(twin, x, tmp_path / "opt.onnx")[0]
        assert (want > 0).any() and np.isin(np.round(want / 2.0 ** -5), [0, 255]).any()  # the clamps are exercised
        np.testing.assert_array_equal(got, want)
    # the point of the twin: onnxruntime now runs the layer as an integer convolution
    optimized = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert "QLinearConv" in optimized and "FusedConv" not in optimized and "Conv" not in optimized
    assert model.graph.node[4].op_type == "Conv" and len(model.graph.node) == len(twin.graph.node) - 2


@pytest.mark.parametrize("case", ["sigmoid in the chain", "two consumers", "float scales", "no chain"])
def test_other_layers_are_left_alone(case):
    if case == "sigmoid in the chain":
        model = qdq_conv_model([("Relu", [], {}), ("Sigmoid", [], {})])
    elif case == "two consumers":
        model = qdq_conv_model([("Clip", [0.0, 6.0], {})], extra_consumer=True)
    elif case == "float scales":  # integer and float convolutions round differently near ties
        model = qdq_conv_model([("Clip", [0.0, 6.0], {})], scales=(0.03, 0.011, 0.025))
    else:  # Conv -> Q directly: onnxruntime fuses it already
        model = qdq_conv_model([])
    twin, added = with_requantized_layer_outputs(model)
    assert added == 0
    assert [n.op_type for n in twin.graph.node] == [n.op_type for n in model.graph.node]
    assert model.graph.node[4].op_type == "Conv"  # the input model is not changed
