"""Cross-layer equalization: kernels, function preservation, range equalization, reporting."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyquant import kernels, reference
from pyquant.errors import ModelError
from pyquant.techniques import cle

# Equalization rescales float32 weights by factors up to ~100: outputs agree to float32
# rounding of the rescaled weights.
EQUIVALENCE_RTOL = 1e-4


@pytest.mark.parametrize("shape", [(0, 1, 1, 4), (1, 1, 1, 1), (7, 1, 1, 9), (4, 3, 8, 9), (1, 16, 32, 1)])
def test_channel_abs_max_matches_reference(shape):
    w = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(kernels.channel_abs_max(w), reference.channel_abs_max(w))


def test_channel_abs_max_of_non_contiguous_view():
    w = np.random.default_rng(0).standard_normal((8, 6, 4, 10)).astype(np.float32)[:, ::2, :, ::3]
    np.testing.assert_array_equal(kernels.channel_abs_max(w), reference.channel_abs_max(w))


def test_equalization_scales_match_reference_with_edge_cases():
    r1 = np.array([1.0, 4.0, 0.0, 2.0, np.inf, 1e-30, 1e30], np.float32)
    r2 = np.array([1.0, 1.0, 3.0, 0.0, 1.0, 1.0, 1e-30], np.float32)
    got = kernels.equalization_scales(r1, r2, 1e4)
    np.testing.assert_allclose(got, reference.equalization_scales(r1, r2, 1e4), rtol=1e-6)
    np.testing.assert_allclose(got[:5], [1.0, 2.0, 1.0, 1.0, 1.0])
    assert got[5] == pytest.approx(1e-4) and got[6] == pytest.approx(1e4)  # clamped


@pytest.mark.parametrize("divide", [False, True])
def test_scale_channels_matches_reference(divide):
    w = np.random.default_rng(1).standard_normal((3, 4, 5, 6)).astype(np.float32)
    s = np.random.default_rng(2).uniform(0.1, 10, 15).astype(np.float32)
    want = reference.scale_channels(w, s, divide)
    kernels.scale_channels(w, s, divide)
    np.testing.assert_allclose(w, want, rtol=1e-6)


def _model(nodes, inits, c_in, out_shape, opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _uneven(rng, shape):
    """Weights whose output channels have ranges spread over two orders of magnitude."""
    return rng.standard_normal(shape) * np.exp(rng.uniform(-2.5, 2.5, (shape[0],) + (1,) * (len(shape) - 1)))


def conv_act_conv(act, rng):
    inits = {"w1": _uneven(rng, (6, 3, 3, 3)), "b1": rng.standard_normal(6), "w2": rng.standard_normal((4, 6, 3, 3)),
             "b2": rng.standard_normal(4), "lo": 0.0, "hi": 6.0}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4)]
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["c1"], ["a1"]))
    elif act == "Clip":
        nodes.append(helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"]))
    else:
        nodes.append(helper.make_node("Identity", ["c1"], ["a1"]))
    nodes.append(helper.make_node("Conv", ["a1", "w2", "b2"], ["y"], pads=[1] * 4))
    return _model(nodes, inits, 3, ["N", 4, 10, 10])


def inverted_residual(rng):
    """1x1 expand -> ReLU6 -> depthwise 3x3 -> ReLU6 -> 1x1 project (MobileNetV2 block)."""
    inits = {"we": _uneven(rng, (12, 4, 1, 1)), "be": rng.standard_normal(12), "wd": _uneven(rng, (12, 1, 3, 3)),
             "bd": rng.standard_normal(12), "wp": rng.standard_normal((5, 12, 1, 1)), "lo": 0.0, "hi": 6.0}
    nodes = [helper.make_node("Conv", ["x", "we", "be"], ["e"]),
             helper.make_node("Clip", ["e", "lo", "hi"], ["ea"]),
             helper.make_node("Conv", ["ea", "wd", "bd"], ["d"], group=12, pads=[1] * 4),
             helper.make_node("Clip", ["d", "lo", "hi"], ["da"]),
             helper.make_node("Conv", ["da", "wp"], ["y"])]
    return _model(nodes, inits, 4, ["N", 5, 10, 10])


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def assert_pairs_equalized(model, report, rtol=3e-3):
    """After CLE, each first-layer output-channel range equals the matching input-channel
    range of the second layer (both sqrt(r1 r2))."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for pair in report.pair_list:
        w1, w2 = inits[pair.first.input[1]], inits[pair.second.input[1]]
        r1 = reference.channel_abs_max(cle._output_view(pair.first, w1))
        r2 = reference.channel_abs_max(cle._input_view(pair.second, w2))
        np.testing.assert_allclose(r1, r2, rtol=rtol)


def spread(model, name):
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
    r = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    return r.max() / r.min()


@pytest.mark.parametrize("act", ["Relu", "Clip", "Identity"])
def test_pair_is_function_preserving_and_equalized(act):
    rng = np.random.default_rng(0)
    model = conv_act_conv(act, rng)
    x = (rng.standard_normal((4, 3, 10, 10)) * 3).astype(np.float32)
    before = run(model, x)
    spread_before = spread(model, "w1")
    eq = onnx.ModelProto()
    eq.CopyFrom(model)
    report = cle.equalize(eq)
    onnx.checker.check_model(eq)
    assert report.pairs == 1
    np.testing.assert_allclose(run(eq, x), before, rtol=EQUIVALENCE_RTOL, atol=EQUIVALENCE_RTOL * np.abs(before).max())
    assert_pairs_equalized(eq, report)
    assert spread(eq, eq.graph.node[0].input[1]) < spread_before
    if act == "Clip":  # the clip now has per-channel bounds: Relu + Min
        assert [n.op_type for n in eq.graph.node][1:3] == ["Relu", "Min"]


def test_inverted_residual_block_balances_all_three_layers():
    rng = np.random.default_rng(1)
    model = inverted_residual(rng)
    x = (rng.standard_normal((4, 4, 10, 10)) * 2).astype(np.float32)
    before = run(model, x)
    eq = onnx.ModelProto()
    eq.CopyFrom(model)
    report = cle.equalize(eq)
    assert report.pairs == 2 and report.rewritten_clips == 2 and report.max_scale_change <= 1e-3
    np.testing.assert_allclose(run(eq, x), before, rtol=EQUIVALENCE_RTOL, atol=EQUIVALENCE_RTOL * np.abs(before).max())
    assert_pairs_equalized(eq, report)
    depthwise = next(n for n in eq.graph.node if n.op_type == "Conv" and n.input[1].startswith("wd"))
    assert spread(eq, depthwise.input[1]) < spread(model, "wd")


def test_gemm_pair_in_both_weight_layouts():
    rng = np.random.default_rng(2)
    inits = {"w1": _uneven(rng, (8, 5)), "b1": rng.standard_normal(8), "w2": rng.standard_normal((8, 3))}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("Gemm", ["a", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((16, 5)).astype(np.float32)
    before = run(model, x)
    eq = onnx.ModelProto()
    eq.CopyFrom(model)
    assert cle.equalize(eq).pairs == 1
    np.testing.assert_allclose(run(eq, x), before, rtol=EQUIVALENCE_RTOL, atol=EQUIVALENCE_RTOL * np.abs(before).max())


def test_unsupported_pattern_is_left_alone_and_reported():
    rng = np.random.default_rng(3)
    inits = {"w1": rng.standard_normal((6, 3, 1, 1)), "w2": rng.standard_normal((4, 6, 1, 1))}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"]), helper.make_node("Sigmoid", ["c1"], ["s"]),
             helper.make_node("Conv", ["s", "w2"], ["y"])]
    model = _model(nodes, inits, 3, ["N", 4, 10, 10])
    report = cle.equalize(model)
    assert report.pairs == 0
    assert any("Sigmoid" in reason for reason in report.skipped.values())


def test_check_equivalence_names_the_broken_pair():
    rng = np.random.default_rng(4)
    model = inverted_residual(rng)
    x = rng.standard_normal((2, 4, 10, 10)).astype(np.float32)
    eq = onnx.ModelProto()
    eq.CopyFrom(model)
    report = cle.equalize(eq)
    assert cle.check_equivalence(model, eq, [{"x": x}], 1e-3, report.pair_list) < 1e-3
    # Break the depthwise layer as a faulty rewrite would: its pair must be named.
    depthwise = next(t for t in eq.graph.initializer if t.name.startswith("wd"))
    depthwise.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(depthwise) * 1.5, depthwise.name))
    with pytest.raises(ModelError, match="-> Clip|-> Relu|Min"):
        cle.check_equivalence(model, eq, [{"x": x}], 1e-3, report.pair_list)
