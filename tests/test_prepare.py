"""Graph preparation: each rewrite is float-exact and changes what it says; the
preparation stage checks every rewrite on a batch; the placement rule keeps elementwise
ops in float between quantized layers (without NPU rules)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import tiny_cnn
from pyquant import preparation
from pyquant.config import get_preset
from pyquant.data import ArrayReader
from pyquant.errors import ModelError
from pyquant.graph.plan import FLOAT_REGION_REASON, plan_for
from pyquant.graph.rewrites.affine import fold_affines
from pyquant.graph.rewrites.batchnorm import unfold_batch_norm_before_layers
from pyquant.graph.rewrites.constants import constants_to_initializers
from pyquant.graph.validate import check_definitions
from pyquant.pipeline import prepare, quantize_model

RTOL = 1e-5  # preparation.PREPARATION_RTOL: the rewrites are exact up to float32 rounding


def run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def assert_same_function(a, b, x):
    for u, v in zip(run(a, x), run(b, x)):
        np.testing.assert_allclose(v, u, rtol=0, atol=RTOL * float(np.max(np.abs(u))))


def make(nodes, inits, in_shape=(2, 4, 8, 8), out="y", opset=17, constants=()):
    graph = helper.make_graph(
        list(constants) + nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def rand(*shape, seed=0, scale=0.5):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32) * scale


X = np.random.default_rng(7).uniform(-1, 1, (2, 4, 8, 8)).astype(np.float32)


def test_constant_nodes_become_initializers_once():
    w = rand(6, 4, 3, 3)
    const = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w"))
    model = make([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], {}, constants=[const])
    before = onnx.ModelProto()
    before.CopyFrom(model)
    assert constants_to_initializers(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Conv"] and model.graph.initializer[0].name == "w"
    check_definitions(model)
    assert_same_function(before, model, X)
    doubled = make([helper.make_node("Conv", ["x", "w"], ["y"])], {"w": w}, constants=[const])
    with pytest.raises(ModelError, match="'w' is defined twice"):
        constants_to_initializers(doubled)


def test_validator_flags_a_hand_broken_model():
    model = make([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y"])], {})
    with pytest.raises(ModelError, match="defined more than once: y"):
        check_definitions(model)
    model = make([helper.make_node("Add", ["x", "nowhere"], ["y"])], {})
    with pytest.raises(ModelError, match="never defined: nowhere"):
        check_definitions(model)


@pytest.mark.parametrize("chain,folded", [
    # after the layer: per-channel Mul, scalar Add, scalar Div, per-channel Sub
    ([("Mul", (6, 1, 1)), ("Add", ())], 2),
    ([("Div", ()), ("Sub", (1, 6, 1, 1))], 2),
])
def test_affines_after_a_conv_fold_into_it(chain, folded):
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["t0"], pads=[1, 1, 1, 1])]
    inits = {"w": rand(6, 4, 3, 3), "b": rand(6)}
    for i, (op, shape) in enumerate(chain):
        inits[f"c{i}"] = np.random.default_rng(i).uniform(0.5, 2.0, shape).astype(np.float32)
        out = "y" if i == len(chain) - 1 else f"t{i + 1}"
        nodes.append(helper.make_node(op, [f"t{i}", f"c{i}"], [out]))
    model = make(nodes, inits)
    before = onnx.ModelProto()
    before.CopyFrom(model)
    assert fold_affines(model) == folded
    assert [n.op_type for n in model.graph.node] == ["Conv"]
    assert_same_function(before, model, X)


def test_scale_before_a_padded_conv_folds_but_a_shift_does_not():
    inits = {"w": rand(6, 4, 3, 3), "s": np.random.default_rng(1).uniform(0.5, 2, (4, 1, 1)), "c": np.full((4, 1, 1), 0.3)}
    padded = make([helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "c"], ["a"]),
                   helper.make_node("Conv", ["a", "w"], ["y"], pads=[1, 1, 1, 1])], inits)
    before = onnx.ModelProto()
    before.CopyFrom(padded)
    assert fold_affines(padded) == 0  # the shift would move the zero padding: left alone (Mul is not adjacent)
    unpadded = make([helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "c"], ["a"]),
                     helper.make_node("Conv", ["a", "w"], ["y"])], inits)
    before.CopyFrom(unpadded)
    assert fold_affines(unpadded) == 2
    assert [n.op_type for n in unpadded.graph.node] == ["Conv"]
    assert_same_function(before, unpadded, X)
    scale_only = make([helper.make_node("Mul", ["x", "s"], ["m"]),
                       helper.make_node("Conv", ["m", "w"], ["y"], pads=[1, 1, 1, 1], group=2)],
                      {"w": rand(6, 2, 3, 3), "s": inits["s"]})
    before.CopyFrom(scale_only)
    assert fold_affines(scale_only) == 1
    assert_same_function(before, scale_only, X)


def test_affines_fold_into_gemm_and_matmul():
    x = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    inits = {"w": rand(3, 8), "b": rand(3), "s": np.random.default_rng(2).uniform(0.5, 2, 8), "k": rand(3), "wm": rand(8, 3)}
    gemm = make([helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Gemm", ["m", "w", "b"], ["g"], transB=1),
                 helper.make_node("Add", ["g", "k"], ["y"])], inits, in_shape=(5, 8))
    matmul = make([helper.make_node("MatMul", ["x", "wm"], ["g"]), helper.make_node("Mul", ["g", "k"], ["y"])],
                  inits, in_shape=(5, 8))
    for model, count in ((gemm, 2), (matmul, 1)):
        before = onnx.ModelProto()
        before.CopyFrom(model)
        assert fold_affines(model) == count
        assert_same_function(before, model, x)


def test_batch_norm_before_a_conv_is_folded_into_it():
    bn = {"g": np.random.default_rng(0).uniform(0.5, 1.5, 4), "beta": rand(4), "mean": rand(4), "var": np.ones(4) * 0.7}
    model = make([helper.make_node("Add", ["x", "x"], ["a"]),
                  helper.make_node("BatchNormalization", ["a", "g", "beta", "mean", "var"], ["n"]),
                  helper.make_node("Conv", ["n", "w"], ["y"])], {**bn, "w": rand(6, 4, 1, 1)})
    before = onnx.ModelProto()
    before.CopyFrom(model)
    assert unfold_batch_norm_before_layers(model) == 1 and fold_affines(model) == 2
    assert [n.op_type for n in model.graph.node] == ["Add", "Conv"]
    assert_same_function(before, model, X)


def test_preparation_checks_each_rewrite_on_a_batch(monkeypatch):
    def broken(model):  # a rewrite that changes the function
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(
            numpy_helper.to_array(model.graph.initializer[0]) * 1.01, model.graph.initializer[0].name))
        return 1

    monkeypatch.setattr(preparation, "REWRITES", [*preparation.REWRITES, ("a broken rewrite", broken)])
    with pytest.raises(ModelError, match="'a broken rewrite' changed output 'y'"):
        preparation.prepare_graph(tiny_cnn(), [{"x": np.ones((2, 3, 16, 16), np.float32)}])


def test_old_opsets_are_upgraded_and_checked(tiny_data):
    prepared, report = preparation.prepare_graph(tiny_cnn(opset=11), [{"x": tiny_data[:8]}])
    assert report.opset_from == 11 and report.opset_to == 13
    assert prepared.opset_import[0].version == 13
    new = quantize_model(tiny_cnn(opset=17), ArrayReader(tiny_data, "x", 16), get_preset("U8S8")).model
    old = quantize_model(tiny_cnn(opset=11), ArrayReader(tiny_data, "x", 16), get_preset("U8S8")).model
    np.testing.assert_array_equal(run(old, tiny_data)[0], run(new, tiny_data)[0])


def silu_and_hardswish_model():
    """Conv -> SiLU (x * sigmoid(x)) -> Conv -> hard-swish written out (Add 3, Clip 0..6,
    Mul, Div 6) -> Conv."""
    inits = {"w1": rand(6, 4, 3, 3), "w2": rand(6, 6, 1, 1), "w3": rand(5, 6, 1, 1), "three": 3.0, "six": 6.0,
             "zero": 0.0}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c1"], ["s1"]), helper.make_node("Mul", ["c1", "s1"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2"], ["c2"]),
             helper.make_node("Add", ["c2", "three"], ["h1"]), helper.make_node("Clip", ["h1", "zero", "six"], ["h2"]),
             helper.make_node("Mul", ["c2", "h2"], ["h3"]), helper.make_node("Div", ["h3", "six"], ["a2"]),
             helper.make_node("Conv", ["a2", "w3"], ["y"])]
    return make(nodes, inits)


def test_elementwise_ops_between_layers_stay_float_without_npu_rules():
    model = prepare(silu_and_hardswish_model())
    assert "HardSwish" in [n.op_type for n in model.graph.node]  # the written-out hard-swish is one op
    u8s8 = plan_for(model, get_preset("U8S8"))
    assert set(u8s8.activations) == {"x", "a1", "a2"}  # the inputs of the three convolutions
    assert sum(reason == FLOAT_REGION_REASON for reason in u8s8.skipped.values()) == 3  # Sigmoid, Mul, HardSwish
    xint8 = plan_for(model, get_preset("XINT8"))  # an NPU computes each activation as one op
    assert {"c1", "a1", "c2", "a2"} <= set(xint8.activations) and "s1" not in xint8.activations


def test_every_stage_leaves_single_definitions(tiny_data):
    """The validator after preparation, CLE and the QDQ writer, on a model whose weights
    are Constant nodes (CLE used to write its rescaled weights under the same names)."""
    model = tiny_cnn()
    for t in list(model.graph.initializer):
        if t.name.startswith("w"):
            model.graph.node.insert(0, helper.make_node("Constant", [], [t.name], value=t))
            model.graph.initializer.remove(t)
    for preset in ("INT8_CLE", "U8S8"):
        result = quantize_model(model, ArrayReader(tiny_data, "x", 16), get_preset(preset))
        check_definitions(result.model)
        onnx.checker.check_model(result.model)
    check_definitions(prepare(model, [{"x": tiny_data[:8]}]))


def test_a_sum_only_a_float_op_reads_stays_float_and_data_movement_after_a_float_op_too():
    """Conv -> residual Add read only by LayerNormalization: without NPU rules the sum and
    its inputs get no pair (the ±200 residual stream of a transformer); Softsign (no
    quantized form) -> Identity -> model output: no pair under NPU rules either."""
    inits = {"w": rand(4, 4, 1, 1), "scale": np.ones(8), "bias": np.zeros(8)}
    model = make([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Add", ["c", "x"], ["s"]),
                  helper.make_node("LayerNormalization", ["s", "scale", "bias"], ["n"], axis=-1),
                  helper.make_node("Softsign", ["n"], ["f"]), helper.make_node("Identity", ["f"], ["y"])], inits)
    u8s8 = plan_for(prepare(model), get_preset("U8S8"))
    assert set(u8s8.activations) == {"x"}
    xint8 = plan_for(prepare(model), get_preset("XINT8"))
    assert "f" not in xint8.activations and "y" not in xint8.activations
    assert {"x", "c", "s"} <= set(xint8.activations)  # NPU rules: the sum is computed in integers


@pytest.mark.parametrize("opset,ops", [(17, ["Conv", "HardSwish", "Conv"]), (13, ["Conv", "HardSigmoid", "Mul", "Conv"])])
def test_written_out_hard_swish_becomes_one_op(opset, ops):
    inits = {"w1": rand(6, 4, 3, 3), "w2": rand(5, 6, 1, 1), "three": 3.0, "six": 6.0, "zero": 0.0}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "three"], ["h1"]), helper.make_node("Clip", ["h1", "zero", "six"], ["h2"]),
             helper.make_node("Mul", ["c", "h2"], ["h3"]), helper.make_node("Div", ["h3", "six"], ["a"]),
             helper.make_node("Conv", ["a", "w2"], ["y"])]
    model = make(nodes, inits, opset=opset)
    prepared, report = preparation.prepare_graph(model, [{"x": X}])
    assert [n.op_type for n in prepared.graph.node] == ops
    assert report.changes["written-out hard-swish / hard-sigmoid fused into one op"] == 1
    assert_same_function(model, prepared, X)
    xint8 = plan_for(prepared, get_preset("XINT8"))  # one quantization point for the activation
    assert set(xint8.activations) == {"x", "c", "a", "y"}


def test_paddle_hard_sigmoid_becomes_one_op():
    inits = {"w": rand(6, 4, 1, 1), "slope": 0.2, "offset": 0.5, "zero": 0.0, "one": 1.0}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "slope"], ["m"]),
             helper.make_node("Add", ["m", "offset"], ["a"]), helper.make_node("Clip", ["a", "zero", "one"], ["g"]),
             helper.make_node("Mul", ["c", "g"], ["y"])]
    model = make(nodes, inits)
    prepared = prepare(model, [{"x": X}])
    assert "HardSigmoid" in [n.op_type for n in prepared.graph.node] and "Clip" not in [n.op_type for n in prepared.graph.node]
    assert_same_function(model, prepared, X)


def test_divisors_are_never_quantized():
    """x / (std + eps) and 1 / std written out: a divisor rounded to zero would be inf."""
    inits = {"w": rand(4, 4, 1, 1), "eps": 1e-6}
    model = make([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Abs", ["c"], ["a"]),
                  helper.make_node("Add", ["a", "eps"], ["d"]), helper.make_node("Div", ["c", "d"], ["q"]),
                  helper.make_node("Reciprocal", ["d"], ["r"]), helper.make_node("Mul", ["q", "r"], ["y"])], inits)
    plan = plan_for(prepare(model), get_preset("XINT8"))
    assert "d" not in plan.activations and plan.float_tensors["d"].startswith("divisor of Div")
    assert "c" in plan.activations


def test_written_out_activations_are_one_quantization_point_under_npu_rules():
    """SiLU and GELU (erf form) written out between convolutions: with NPU rules only their
    input and output are quantized; the steps inside are not."""
    inits = {"w1": rand(6, 4, 1, 1), "w2": rand(6, 6, 1, 1), "w3": rand(5, 6, 1, 1), "half": 0.5, "one": 1.0,
             "root2": 1.4142135}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"]),
             helper.make_node("Sigmoid", ["c1"], ["s"]), helper.make_node("Mul", ["c1", "s"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2"], ["c2"]),
             helper.make_node("Div", ["c2", "root2"], ["g1"]), helper.make_node("Erf", ["g1"], ["g2"]),
             helper.make_node("Add", ["g2", "one"], ["g3"]), helper.make_node("Mul", ["c2", "g3"], ["g4"]),
             helper.make_node("Mul", ["g4", "half"], ["a2"]),
             helper.make_node("Conv", ["a2", "w3"], ["y"])]
    model = prepare(make(nodes, inits))  # the * 0.5 is folded into the last Conv: g4 is its input
    xint8 = plan_for(model, get_preset("XINT8"))
    assert {"x", "c1", "a1", "c2", "g4", "y"} <= set(xint8.activations)
    assert not {"s", "g1", "g2", "g3"} & set(xint8.activations)
    assert xint8.float_tensors["s"].startswith("inside a written-out activation")


def test_constant_data_movement_folds_and_a_paddle_bias_joins_its_conv():
    # paddle2onnx writes a Conv bias as Add(conv, Reshape(bias, [1, C, 1, 1])): folded, the
    # Reshape is an initializer, and the Add folds into the Conv like any constant shift
    inits = {"w": rand(3, 4, 3, 3), "b": rand(3, seed=1), "shape": np.array([1, 3, 1, 1], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["b", "shape"], ["b4"]),
             helper.make_node("Add", ["c", "b4"], ["y"])]
    model = make(nodes, inits)
    model.graph.initializer[-1].CopyFrom(numpy_helper.from_array(inits["shape"], "shape"))  # int64, not float
    prepared, report = preparation.prepare_graph(model, [{"x": X}])
    assert report.changes["constant Slice/Concat/Reshape/... folded into initializers"] == 1
    assert [n.op_type for n in prepared.graph.node] == ["Conv"] and len(prepared.graph.node[0].input) == 3
    assert_same_function(model, prepared, X)


def test_constant_gather_that_repeats_rows_is_not_folded():
    # folding must not grow the model: a Gather repeating a constant's rows stays a node
    table = rand(4, 8)
    index = np.zeros(64, np.int64)
    nodes = [helper.make_node("Gather", ["table", "index"], ["rows"]),
             helper.make_node("ReduceSum", ["rows"], ["total"], keepdims=0),
             helper.make_node("Add", ["x", "total"], ["y"])]
    model = make(nodes, {"table": table}, in_shape=(2, 8))
    model.graph.initializer.append(numpy_helper.from_array(index, "index"))
    prepared, report = preparation.prepare_graph(model, [{"x": X[:, 0, 0, :]}])
    assert report.changes["constant Slice/Concat/Reshape/... folded into initializers"] == 0
    assert "Gather" in [n.op_type for n in prepared.graph.node]
