"""Cross-layer equalization: kernels, function preservation, range equalization, reporting."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyquant import kernels, reference
from pyquant.errors import ModelError
from pyquant.runtime import PeekedReader
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


@pytest.mark.parametrize("n", [0, 1, 2, 5, 64])
@pytest.mark.parametrize("act_weight", [0.0, 0.25, 0.5, 1.0])
def test_activation_aware_scales_match_reference(n, act_weight):
    rng = np.random.default_rng(n)
    r1, r2 = (rng.lognormal(0, 2, n).astype(np.float32) for _ in range(2))
    act = rng.lognormal(0, 3, n).astype(np.float32)
    if n >= 5:  # a dead channel, an unusable one and a weight range of zero
        act[0], act[1], act[2], r1[3] = 0.0, np.inf, np.nan, 0.0
    got = kernels.equalization_scales(r1, r2, 1e4, act, act_weight)
    np.testing.assert_allclose(got, reference.equalization_scales(r1, r2, 1e4, act, act_weight), rtol=1e-6)
    if n >= 5:
        # dead/unusable activation channels fall back to the weights-only scale
        np.testing.assert_allclose(got[:3], np.sqrt(r1[:3] / r2[:3]), rtol=1e-6)
        assert got[3] == 1.0


def test_activation_aware_scales_properties():
    rng = np.random.default_rng(3)
    r1, r2, act = (rng.lognormal(0, 2, 32).astype(np.float32) for _ in range(3))
    plain = kernels.equalization_scales(r1, r2)
    np.testing.assert_array_equal(kernels.equalization_scales(r1, r2, 1e4, act, 0.0), plain)
    # rho puts act in the weights' units: a uniform rescaling of act changes nothing
    aware = kernels.equalization_scales(r1, r2, 1e4, act, 0.5)
    np.testing.assert_allclose(kernels.equalization_scales(r1, r2, 1e4, act * 1e3, 0.5), aware, rtol=1e-5)
    # act_weight 1: the first layer's range no longer counts, only the activation's
    only_act = kernels.equalization_scales(r1, r2, 1e4, act, 1.0)
    rho = np.median(r1.astype(np.float64)) / np.median(act.astype(np.float64))
    np.testing.assert_allclose(only_act, np.sqrt(rho * act / r2), rtol=1e-5)


def test_activation_aware_scales_reject_bad_arguments():
    r = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="act must have the length"):
        kernels.equalization_scales(r, r, 1e4, np.ones(3, np.float32), 0.5)
    with pytest.raises(ValueError, match="act_weight"):
        kernels.equalization_scales(r, r, 1e4, r, 1.5)


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


def _channel_range_spread(model, tensor, x):
    """max / min over channels of max |tensor| on x (the per-channel activation ranges)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    value = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        [tensor], {"x": x})[0]
    r = np.abs(value).max(axis=(0, 2, 3))
    return r.max() / r[r > 0].min()


def test_activation_aware_equalization_preserves_function_and_keeps_activations_even():
    rng = np.random.default_rng(4)
    model = inverted_residual(rng)
    x = (rng.standard_normal((8, 4, 10, 10)) * 2).astype(np.float32)
    before = run(model, x)
    results = {}
    for weight in (0.0, 0.5):
        eq = onnx.ModelProto()
        eq.CopyFrom(model)
        report = cle.equalize(eq, cle.CLEOptions(activation_weight=weight), [{"x": x}])
        assert report.max_scale_change <= 1e-3
        onnx.checker.check_model(eq)
        np.testing.assert_allclose(run(eq, x), before, rtol=EQUIVALENCE_RTOL,
                                   atol=EQUIVALENCE_RTOL * np.abs(before).max())
        results[weight] = eq, report
    eq, report = results[0.5]
    # tracked ranges follow the rescaling: they are the equalized model's measured ranges
    for pair in report.pair_list:
        fresh = [cle.Pair(pair.first, pair.second, pair.between, pair.total_scale)]
        cle.measure_activation_ranges(eq, fresh, [{"x": x}])
        np.testing.assert_allclose(pair.activation_range, fresh[0].activation_range, rtol=1e-4)
    # the depthwise output ("da") keeps evener channel ranges than weights-only CLE gives it
    spread_plain = _channel_range_spread(results[0.0][0], "da", x)
    spread_aware = _channel_range_spread(eq, "da", x)
    assert spread_aware < spread_plain
    # without data the activation weight is moot: weights-only scales
    data_free = onnx.ModelProto()
    data_free.CopyFrom(model)
    cle.equalize(data_free, cle.CLEOptions(activation_weight=0.5))
    for a, b in zip(data_free.graph.initializer, results[0.0][0].graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


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


@pytest.mark.parametrize("activation_weight", [0.25, 0.0])  # ranges measured in the same pass, or not at all
def test_equalize_checks_against_the_original_it_observed(activation_weight, monkeypatch):
    """equalize(check_feeds=1) compares with the outputs it took before rescaling (no copy of
    the original): a correct transform passes, a transform that changes the function (Clip
    bounds left unscaled) is named."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 4, 10, 10)).astype(np.float32)
    options = cle.CLEOptions(activation_weight=activation_weight)
    report = cle.equalize(inverted_residual(rng), options, [{"x": x}], check_feeds=1)
    assert report.pairs > 0
    monkeypatch.setattr(cle, "_rewrite_clips", lambda model, view, pairs: 0)
    with pytest.raises(ModelError, match="cross-layer equalization"):
        cle.equalize(inverted_residual(np.random.default_rng(4)), options, [{"x": x}], check_feeds=1)


class _Batches:
    def __init__(self, n, size):
        self.batches = [{"x": np.full((size, 1), i, np.float32)} for i in range(n)]
        self.rewind()

    def rewind(self):
        self.position = 0

    def get_next(self):
        if self.position == len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]


@pytest.mark.parametrize("samples,peeked", [(1, 1), (5, 3), (100, 5)])
def test_peeked_batches_are_replayed_once_in_order(samples, peeked):

    reader = PeekedReader(_Batches(5, 2), samples)
    assert len(reader.peeked) == peeked
    reader.peeked.clear()  # what the pipeline does after CLE: the replay queue is separate
    seen = [int(b["x"][0, 0]) for b in iter(reader.get_next, None)]
    assert seen == [0, 1, 2, 3, 4]
    reader.rewind()
    assert [int(b["x"][0, 0]) for b in iter(reader.get_next, None)] == [0, 1, 2, 3, 4]
