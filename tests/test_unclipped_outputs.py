"""QuantConfig.unclipped_output_layers: activations near the outputs keep their whole range,
except within clipped_input_layers of an input (pyquant.graph.depth counts the weighted
layers to the outputs and from the inputs)."""
import dataclasses
import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyquant.api import quantize_detailed
from pyquant.calibrate.methods import qparams_from_range
from pyquant.config import QuantConfig, QuantType, get_preset
from pyquant.errors import ConfigError
from pyquant.graph.depth import layers_from_inputs, layers_to_outputs

CHANNELS = 4


def pointwise_chain(seed: int = 0):
    """x -> 1x1 Conv -> Relu (r1) -> 1x1 Conv -> Relu (r2) -> 1x1 Conv (y), and the weights."""
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((CHANNELS, CHANNELS, 1, 1)).astype(np.float32) for _ in range(3)]
    init = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c1"]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w1"], ["c2"]), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w2"], ["y"])]
    shape = ["N", CHANNELS, 8, 8]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), weights


def pointwise(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.einsum("oc,nchw->nohw", w[:, :, 0, 0], x)


def test_layers_are_counted_along_the_shortest_path_skips_included():
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w"], ["c2"]), helper.make_node("Add", ["r1", "c2"], ["a"]),
             helper.make_node("Conv", ["a", "w"], ["y"]), helper.make_node("Neg", ["x"], ["unused"])]
    info = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2, 4, 4])  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "skip", [info("x")], [info("y")], [w]))
    assert layers_to_outputs(model) == {"y": 0, "a": 1, "c2": 1, "r1": 1, "c1": 1, "x": 2}
    assert layers_from_inputs(model) == {"x": 0, "unused": 0, "c1": 1, "r1": 1, "a": 1, "c2": 2, "y": 2}


def test_a_control_flow_node_leads_from_what_its_bodies_read_and_counts_their_layers():
    """An If left in the graph: the Conv in its then-branch reads c1 from the enclosing graph,
    so the If's output o is one weighted layer past c1 counted from the input, and c1 one
    before o counted from the output."""
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    info = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2, 4, 4])  # noqa: E731
    then_branch = helper.make_graph([helper.make_node("Conv", ["c1", "w"], ["t"])], "then", [], [info("t")])
    else_branch = helper.make_graph([helper.make_node("Relu", ["c1"], ["e"])], "else", [], [info("e")])
    nodes = [helper.make_node("Constant", [], ["flag"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("Conv", ["x", "w"], ["c1"]),
             helper.make_node("If", ["flag"], ["o"], then_branch=then_branch, else_branch=else_branch),
             helper.make_node("Conv", ["o", "w"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "if", [info("x")], [info("y")], [w]))
    assert layers_from_inputs(model) == {"x": 0, "c1": 1, "o": 2, "y": 3}  # flag: a constant, not listed
    assert layers_to_outputs(model) == {"y": 0, "o": 1, "c1": 2, "flag": 2, "x": 3}


@pytest.fixture
def chain_data():
    x = np.random.default_rng(1).standard_normal((32, CHANNELS, 8, 8)).astype(np.float32)
    x[0, 0, 0, 0] = 40.0  # one outlier: the percentile clips every tensor it reaches
    return x


def _range(qp, qtype: QuantType = QuantType.QUInt8):
    scale, zero_point = float(qp.scale), int(qp.zero_point)
    return (qtype.qmin - zero_point) * scale, (qtype.qmax - zero_point) * scale


def test_the_last_layers_inputs_keep_their_whole_range(chain_data):
    model, (w0, w1, _) = pointwise_chain()
    r1 = np.maximum(pointwise(chain_data, w0), 0)
    r2 = np.maximum(pointwise(r1, w1), 0)
    base = dataclasses.replace(get_preset("U8S8"), percentile=99.0, unclipped_output_layers=None,
                               clipped_input_layers=None)
    clipped = quantize_detailed(model, chain_data, base).table.activations
    kept = quantize_detailed(model, chain_data, dataclasses.replace(base, unclipped_output_layers=1)).table.activations
    whole = qparams_from_range(0.0, float(r2.max()), QuantType.QUInt8, symmetric=False)
    assert _range(kept["r2"])[1] == pytest.approx(_range(whole)[1], rel=1e-5)  # MinMax of the float r2
    assert _range(clipped["r2"])[1] < 0.9 * float(r2.max())  # the percentile clips it without the option
    assert _range(kept["r1"])[1] < 0.9 * float(r1.max())  # two layers from the output: still clipped
    assert float(kept["r1"].scale) == float(clipped["r1"].scale)
    assert float(kept["x"].scale) == float(clipped["x"].scale)


def test_tensors_near_an_input_keep_their_clipping(chain_data):
    model, (w0, w1, _) = pointwise_chain()
    r2 = np.maximum(pointwise(np.maximum(pointwise(chain_data, w0), 0), w1), 0)
    base = dataclasses.replace(get_preset("U8S8"), percentile=99.0, unclipped_output_layers=None,
                               clipped_input_layers=None)
    clipped = quantize_detailed(model, chain_data, base).table.activations
    # r1 is 2 layers from the output and 1 from the input, r2 1 and 2, x 3 and 0
    near_one = quantize_detailed(model, chain_data, dataclasses.replace(base, unclipped_output_layers=3,
                                                                        clipped_input_layers=1)).table.activations
    assert _range(near_one["r2"])[1] == pytest.approx(float(r2.max()), rel=1e-5)
    assert float(near_one["r1"].scale) == float(clipped["r1"].scale)
    assert float(near_one["x"].scale) == float(clipped["x"].scale)
    everything = quantize_detailed(model, chain_data, dataclasses.replace(base, unclipped_output_layers=3,
                                                                          clipped_input_layers=None)).table.activations
    assert float(everything["r1"].scale) > 1.1 * float(clipped["r1"].scale)  # without the limit r1 is whole too
    near_two = quantize_detailed(model, chain_data, dataclasses.replace(base, unclipped_output_layers=3,
                                                                        clipped_input_layers=2)).table.activations
    assert all(float(near_two[t].scale) == float(clipped[t].scale) for t in ("x", "r1", "r2"))


def test_the_u8s8_preset_keeps_whole_ranges_near_outputs_and_clips_near_inputs():
    u8s8 = get_preset("U8S8")
    assert (u8s8.unclipped_output_layers, u8s8.clipped_input_layers) == (4, 4)
    assert get_preset("XINT8").unclipped_output_layers is None and get_preset("A8W8").unclipped_output_layers is None


def test_power_of_two_scales_take_the_non_overflowing_exponent(chain_data):
    model, (w0, w1, _) = pointwise_chain()
    r2 = np.maximum(pointwise(np.maximum(pointwise(chain_data, w0), 0), w1), 0)
    table = quantize_detailed(model, chain_data, dataclasses.replace(get_preset("XINT8"), unclipped_output_layers=1)).table
    levels = 255  # uint8, zero point 0 for a non-negative tensor
    assert float(table.activations["r2"].scale) == 2.0 ** math.ceil(math.log2(float(r2.max()) / levels))


@pytest.mark.parametrize("value", [-1, 1.5, True])
@pytest.mark.parametrize("field", ["unclipped_output_layers", "clipped_input_layers"])
def test_bad_values_are_refused(value, field):
    with pytest.raises(ConfigError, match=field):
        QuantConfig(**{field: value})


def test_an_input_side_limit_without_whole_ranges_is_refused():
    with pytest.raises(ConfigError, match="clipped_input_layers=2 limits unclipped_output_layers, which is None"):
        QuantConfig(clipped_input_layers=2)
    with pytest.raises(ConfigError, match="clipped_input_layers=4 limits"):
        dataclasses.replace(get_preset("U8S8"), unclipped_output_layers=None)
