"""High-bias absorption: exact where it applies, smaller activation ranges, clear skips."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyquant.techniques import bias_absorption, cle


def _model(second_pads, clip, groups=1):
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((6, 3, 3, 3)) * 0.3,
             "b1": np.array([4.0, 0.5, 6.0, -1.0, 3.0, 8.0]),  # high biases: channels stay above 0
             "w2": rng.standard_normal((4, 6 // groups, 1, 1)), "b2": rng.standard_normal(4),
             "lo": 0.0, "hi": 6.0}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4)]
    nodes.append(helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"]) if clip else
                 helper.make_node("Relu", ["c1"], ["a1"]))
    nodes.append(helper.make_node("Conv", ["a1", "w2", "b2"], ["y"], group=groups, pads=[second_pads] * 4))
    size = 8 + 2 * second_pads
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, size, size])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _gemm_model():
    rng = np.random.default_rng(1)
    inits = {"w1": rng.standard_normal((5, 6)) * 0.3, "b1": np.array([4.0, 0.5, 6.0, -1.0, 3.0, 8.0]),
             "w2": rng.standard_normal((6, 4))}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["c1"]), helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("Gemm", ["a1", "w2"], ["y"])]  # no bias: absorption creates one
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x, outputs=("y",)):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in outputs:
        if name not in known:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(list(outputs), {"x": x})


@pytest.mark.parametrize("clip,groups", [(False, 1), (True, 1), (True, 2)])
def test_absorption_is_exact_on_its_data_and_shrinks_the_activation(clip, groups):
    model = _model(0, clip, groups)
    x = np.random.default_rng(2).standard_normal((16, 3, 8, 8)).astype(np.float32)
    before = _run(model, x)[0]
    report = cle.equalize(model, cle.CLEOptions(), [{"x": x}])
    act_before = _run(model, x, ("a1",))[0]
    absorbed = bias_absorption.absorb_high_biases(model, report.pair_list, [{"x": x}], sigmas=3.0)
    onnx.checker.check_model(model)
    assert absorbed.pairs == 1 and absorbed.channels > 0
    after, act_after = _run(model, x, ("y", "a1"))
    # c <= the observed minimum: exact on the data it was measured on
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    # each channel moved down by a constant c >= 0 (positive for some), still >= 0
    shift = act_before - act_after
    c = shift.max(axis=(0, 2, 3))
    np.testing.assert_allclose(shift, np.broadcast_to(c[None, :, None, None], shift.shape), atol=1e-4)
    assert np.all(c >= -1e-6) and np.count_nonzero(c > 1e-3) == absorbed.channels
    assert act_after.min() >= 0


def test_absorption_moves_the_constant_part_into_the_next_bias_for_gemm():
    model = _gemm_model()
    x = np.random.default_rng(3).standard_normal((64, 5)).astype(np.float32)
    before, act = _run(model, x, ("y", "a1"))
    pairs, _ = cle.find_pairs(model)
    absorbed = bias_absorption.absorb_high_biases(model, pairs, [{"x": x}], sigmas=3.0)
    assert absorbed.pairs == 1
    after, act_after = _run(model, x, ("y", "a1"))
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    # channel 0 (bias 4, small weights) stays well above 0: part of it is absorbed
    assert act_after[:, 0].max() < act[:, 0].max() - 0.5
    np.testing.assert_allclose(act_after[:, 3], act[:, 3])  # bias -1: nothing to absorb


def test_padded_second_layer_is_left_alone_and_reported():
    model = _model(1, clip=False)
    x = np.random.default_rng(4).standard_normal((8, 3, 8, 8)).astype(np.float32)
    pairs, _ = cle.find_pairs(model)
    absorbed = bias_absorption.absorb_high_biases(model, pairs, [{"x": x}])
    assert absorbed.pairs == 0
    assert "pads its input" in next(iter(absorbed.skipped.values()))
