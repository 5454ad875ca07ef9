"""BN folding, the quantization plan, and the QDQ rewrite on small models built here."""
import collections
import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyquant.config import PRESETS, get_preset
from pyquant.config import QuantType as pyquant_types
from pyquant.data import ArrayReader
from pyquant.errors import ConfigError, ModelError
from pyquant.graph.rewrites.batchnorm import fold_batch_norm
from pyquant.graph.plan import build_plan
from pyquant.pipeline import prepare, quantize_model

from conftest import tiny_cnn

# Relative RMS error of the logits of the tiny CNN after quantization (measured: XINT8
# 0.033, the float-scale presets 0.010 to 0.017); 0.1 leaves room for other seeds.
MAX_RELATIVE_RMS_ERROR = 0.1
BN_FOLD_ATOL = 1e-5


def run(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def rel_rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


def test_fold_batch_norm_preserves_output(tiny_model, tiny_data):
    folded = onnx.ModelProto()
    folded.CopyFrom(tiny_model)
    assert fold_batch_norm(folded) == 1
    assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}
    np.testing.assert_allclose(run(folded, tiny_data), run(tiny_model, tiny_data), atol=BN_FOLD_ATOL)


def test_plan_fuses_activations_and_shares_npu_scales(tiny_model):
    prepared = prepare(tiny_model)
    plan = build_plan(prepared, enable_npu_cnn=True)
    assert "r1" in plan.activations and "bn1" not in plan.activations  # Conv(+BN) -> Relu fused
    assert "r2" in plan.activations and "c2" not in plan.activations  # Conv -> Clip fused
    assert "c3" in plan.activations  # Conv -> Add is not an activation
    groups = plan.group_of()
    assert groups["p1"] == groups["a1"]  # MaxPool keeps its input scale (all presets)
    assert groups["p2"] == groups["a1"] == groups["cat"]  # NPU: AveragePool, Concat
    assert groups["flat"] == groups["gap"] == groups["cat"]
    assert len(plan.weights) == 4 and len(plan.biases) == 3


def test_plan_without_npu_rules_keeps_average_pool_and_concat_separate(tiny_model):
    plan = build_plan(prepare(tiny_model), enable_npu_cnn=False)
    groups = plan.group_of()
    assert groups["p1"] == groups["a1"]
    assert groups["p2"] != groups["a1"] and groups["cat"] != groups["p1"]


VALID_COMBINATIONS = [(name, per_channel) for name, cfg in PRESETS.items() for per_channel in (False, True)
                      # NPUs: one power-of-two scale per tensor; bfloat16 has no scales
                      if not (per_channel and (cfg.power_of_two or cfg.activation_type.is_float))]


@pytest.mark.parametrize("preset,per_channel", VALID_COMBINATIONS)
def test_quantized_model_is_valid_runs_and_is_accurate(preset, per_channel, tiny_model, tiny_data):
    config = dataclasses.replace(get_preset(preset), per_channel=per_channel)
    result = quantize_model(tiny_model, ArrayReader(tiny_data, "x", 16), config)
    q = result.model
    onnx.checker.check_model(q)
    ops = collections.Counter(n.op_type for n in q.graph.node)
    acts = [a for a in result.plan.activations if a not in result.plan.constant_activations]
    if config.activation_type.is_float:  # Cast pairs; the biases stay float
        casts = collections.Counter(n.attribute[0].i for n in q.graph.node if n.op_type == "Cast")
        assert casts[TensorProto.BFLOAT16] == len(acts) and not ops["QuantizeLinear"]
        assert casts[TensorProto.FLOAT] == len(result.plan.activations) + len(result.plan.weights)
    else:
        assert ops["QuantizeLinear"] == len(acts)
        assert ops["DequantizeLinear"] == (len(result.plan.activations) + len(result.plan.weights)
                                           + len(result.plan.biases))
    assert [o.name for o in q.graph.output] == ["y"]
    err = rel_rms(run(q, tiny_data), run(tiny_model, tiny_data))
    assert err < MAX_RELATIVE_RMS_ERROR, f"{preset}: relative RMS error {err:.3f}"


def _initializers(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_xint8_uses_power_of_two_scales_int8_weights_and_int32_bias(tiny_model, tiny_data):
    q = quantize_model(tiny_model, ArrayReader(tiny_data, "x", 16), get_preset("XINT8")).model
    inits = _initializers(q)
    for node in q.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = inits[node.input[1]]
        assert scale.size == 1
        assert np.log2(scale) == np.round(np.log2(scale)), node.name
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            data = inits[node.input[0]]
            assert data.dtype in (np.int8, np.int32, np.uint8)
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    producers = {o: n for n in q.graph.node for o in n.output}
    x_scale = inits[producers[conv.input[0]].input[1]]
    w_scale = inits[producers[conv.input[1]].input[1]]
    b_dq = producers[conv.input[2]]
    assert inits[b_dq.input[0]].dtype == np.int32
    np.testing.assert_allclose(inits[b_dq.input[1]], x_scale * w_scale, rtol=1e-6)


def test_per_channel_weights_have_an_axis(tiny_model, tiny_data):
    cfg = dataclasses.replace(get_preset("U8S8"), per_channel=True)
    q = quantize_model(tiny_model, ArrayReader(tiny_data, "x", 16), cfg).model
    inits = _initializers(q)
    gemm = next(n for n in q.graph.node if n.op_type == "Gemm")
    dq = next(n for n in q.graph.node if n.output[0] == gemm.input[1])
    assert inits[dq.input[1]].shape == (10,)
    assert helper.get_attribute_value(dq.attribute[0]) == 0


def test_unsupported_op_stays_float_and_is_reported(tiny_data):
    model = tiny_cnn()
    gemm = model.graph.node[-1]
    gemm.output[0] = "logits"
    model.graph.node.append(helper.make_node("Softmax", ["logits"], ["y"], axis=1))
    result = quantize_model(model, ArrayReader(tiny_data, "x", 16), get_preset("U8S8"))
    assert any("Softmax" in reason for reason in result.plan.skipped.values())
    assert "Softmax" in {n.op_type for n in result.model.graph.node}
    onnx.checker.check_model(result.model)


def test_already_quantized_model_is_rejected(tiny_model, tiny_data):
    q = quantize_model(tiny_model, ArrayReader(tiny_data, "x", 16), get_preset("U8S8")).model
    with pytest.raises(ModelError, match="already quantized"):
        quantize_model(q, ArrayReader(tiny_data, "x", 16), get_preset("U8S8"))


def test_matmul_with_two_activations_quantizes_both_inputs():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [4, 8])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [8, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])
    model = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "mm", [a, b], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)

    class Reader:
        def __init__(self):
            self.left = 3

        def get_next(self):
            self.left -= 1
            return None if self.left < 0 else {"a": rng.standard_normal((4, 8)).astype(np.float32),
                                               "b": rng.standard_normal((8, 3)).astype(np.float32)}

    result = quantize_model(model, Reader(), get_preset("A8W8"))  # A8W8 leaves the model output in float
    assert set(result.plan.activations) == {"a", "b"}
    onnx.checker.check_model(result.model)
    config = dataclasses.replace(get_preset("A8W8"), quantize_region_outputs=True)
    assert set(quantize_model(model, Reader(), config).plan.activations) == {"a", "b", "y"}


def _with_softmax(model):
    """tiny_cnn with a Softmax (an op left in float) after its Gemm."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.node[-1].output[0] = "logits"
    m.graph.node.append(helper.make_node("Softmax", ["logits"], ["y"], axis=1))
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("with_softmax", [False, True])
def test_region_outputs_keep_float_without_quantize_region_outputs(with_softmax, tiny_model, tiny_data):
    model = _with_softmax(tiny_model) if with_softmax else tiny_model
    last = "logits" if with_softmax else "y"  # the Gemm's output: read by Softmax, or the model output
    prepared = prepare(model)
    assert last in build_plan(prepared, False, quantize_region_outputs=True).activations
    plan = build_plan(prepared, False, quantize_region_outputs=False)
    assert last not in plan.activations and "flat" in plan.activations and len(plan.weights) == 4

    reference = run(model, tiny_data)
    errors = {}
    for region_outputs in (True, False):
        config = dataclasses.replace(get_preset("U8S8"), quantize_region_outputs=region_outputs)
        q = quantize_model(model, ArrayReader(tiny_data, "x", 16), config).model
        onnx.checker.check_model(q)
        gemm_output = next(n.output[0] for n in q.graph.node if n.op_type == "Gemm")
        rounded = any(n.op_type == "QuantizeLinear" and n.input[0] == gemm_output for n in q.graph.node)
        assert rounded is region_outputs
        errors[region_outputs] = rel_rms(run(q, tiny_data), reference)
    # the same quantized layers, minus the rounding of the last layer's output
    assert errors[False] < errors[True], errors


def _split_model(outputs: int) -> onnx.ModelProto:
    """Conv -> Split into ``outputs`` parts on channels, each part through its own Conv,
    the results concatenated: every Split output is read by a quantized op."""
    rng = np.random.default_rng(3)
    channels = 2 * outputs
    gain = np.repeat(0.25 ** np.arange(outputs), 2)[:, None, None, None]  # part i: about 4^-i of part 0's range
    init = [numpy_helper.from_array((rng.standard_normal((channels, 3, 3, 3)) * gain).astype(np.float32), "w0"),
            numpy_helper.from_array(np.full(outputs, 2, np.int64), "split")]
    parts = [f"part{i}" for i in range(outputs)]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Split", ["c0", "split"], parts, axis=1)]
    for i, part in enumerate(parts):
        init.append(numpy_helper.from_array((rng.standard_normal((4, 2, 1, 1)) * 0.3).astype(np.float32),
                                            f"w{i + 1}"))
        nodes.append(helper.make_node("Conv", [part, f"w{i + 1}"], [f"c{i + 1}"]))
    nodes.append(helper.make_node("Concat", [f"c{i + 1}" for i in range(outputs)], ["y"], axis=1))
    graph = helper.make_graph(nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4 * outputs, 8, 8])],
                              init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("outputs", [2, 3])
@pytest.mark.parametrize("preset", ["XINT8", "U8S8"])
def test_every_split_output_shares_the_input_scale(outputs, preset):
    model = _split_model(outputs)
    parts = [f"part{i}" for i in range(outputs)]
    plan = build_plan(prepare(model), enable_npu_cnn=False)
    groups = plan.group_of()
    assert {groups[p] for p in parts} == {groups["c0"]}
    assert [m for m in plan.groups if "c0" in m] == [["c0"] + parts]

    # The parts' ranges differ by 4x each (part 0's is the input's), so only a shared group
    # makes the written scales equal.
    data = np.random.default_rng(4).uniform(-1, 1, (16, 3, 8, 8)).astype(np.float32)
    q = quantize_model(model, ArrayReader(data, "x", 8), get_preset(preset)).model
    inits = _initializers(q)
    quantize_of = {n.input[0]: n for n in q.graph.node if n.op_type == "QuantizeLinear"}
    scale = {t: (inits[quantize_of[t].input[1]], inits[quantize_of[t].input[2]]) for t in ["c0"] + parts}
    for part in parts:
        np.testing.assert_array_equal(scale[part][0], scale["c0"][0])
        np.testing.assert_array_equal(scale[part][1], scale["c0"][1])
    assert rel_rms(run(q, data), run(model, data)) < MAX_RELATIVE_RMS_ERROR


def test_excluded_nodes_compute_in_float_on_float_inputs(tiny_model, tiny_data):
    config = dataclasses.replace(get_preset("U8S8"), nodes_to_exclude=frozenset({"Conv(c3)"}))
    result = quantize_model(tiny_model, ArrayReader(tiny_data, "x", 16), config)
    conv = next(n for n in result.model.graph.node if n.op_type == "Conv" and n.output[0] == "c3")
    assert conv.input[0] == "r2" and conv.input[1] == "wp"  # float activation and float weight
    assert "Conv(c3)" in result.plan.skipped and "Conv(c3)" in result.plan.excluded
    only_conv = dataclasses.replace(get_preset("U8S8"), op_types_to_quantize=frozenset({"Conv"}))
    plan = quantize_model(tiny_model, ArrayReader(tiny_data, "x", 16), only_conv).plan
    assert {u.node.op_type for u in plan.weights} == {"Conv"} and "Gemm(y)" in plan.skipped
    with pytest.raises(ConfigError, match="names no node of the model: Conv\\(nothing\\)"):
        quantize_model(tiny_model, ArrayReader(tiny_data, "x", 16),
                       dataclasses.replace(config, nodes_to_exclude=frozenset({"Conv(nothing)"})))
    with pytest.raises(ConfigError, match="does not quantize: Softmax"):
        quantize_model(tiny_model, ArrayReader(tiny_data, "x", 16),
                       dataclasses.replace(config, op_types_to_quantize=frozenset({"Softmax"})))


def output_error(model, quantized, x):
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    reference = run(model)
    return float(np.sqrt(np.mean((run(quantized) - reference) ** 2)) / np.sqrt(np.mean(reference ** 2)))


def test_a16w8_writes_int16_activations_at_opset_21(tiny_model, tiny_data):
    q = quantize_model(tiny_model, ArrayReader(tiny_data, "x", 16), get_preset("A16W8")).model
    onnx.checker.check_model(q)
    assert next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) == 21
    zero_points = [t for t in q.graph.initializer if t.name.endswith("_QuantizeLinear_Output_zero_point")]
    assert zero_points and all(t.data_type == TensorProto.INT16 for t in zero_points)
    u8s8 = quantize_model(tiny_model, ArrayReader(tiny_data, "x", 16), get_preset("U8S8")).model
    same_but_8_bit = dataclasses.replace(get_preset("A16W8"), activation_type=pyquant_types.QInt8)
    a8w8 = quantize_model(tiny_model, ArrayReader(tiny_data, "x", 16), same_but_8_bit).model
    assert output_error(tiny_model, q, tiny_data) < 0.8 * output_error(tiny_model, a8w8, tiny_data)
    assert output_error(tiny_model, q, tiny_data) < output_error(tiny_model, u8s8, tiny_data)


def test_tensor_types_give_chosen_tensors_16_bits(tiny_model, tiny_data):
    config = dataclasses.replace(get_preset("U8S8"), tensor_types={"r1": pyquant_types.QInt16})
    q = quantize_model(tiny_model, ArrayReader(tiny_data, "x", 16), config).model
    types = {t.name: t.data_type for t in q.graph.initializer if t.name.endswith("_QuantizeLinear_Output_zero_point")}
    assert types.pop("r1_QuantizeLinear_Output_zero_point") == TensorProto.INT16
    assert set(types.values()) == {TensorProto.UINT8}
    with pytest.raises(ConfigError, match="not quantized activations: nowhere"):
        quantize_model(tiny_model, ArrayReader(tiny_data, "x", 16),
                       dataclasses.replace(config, tensor_types={"nowhere": pyquant_types.QInt16}))


def _concat_tail(then_conv: bool, pool: bool = False) -> onnx.ModelProto:
    """Two Convs on x joined by a Concat (a detector's boxes and scores) that is the model
    output, or, with ``then_conv``, read by a third Conv; ``pool`` puts an AveragePool
    after the Concat."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array((rng.standard_normal((4, 3, 1, 1)) * 0.5).astype(np.float32), name)
            for name in ("wa", "wb")]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"]), helper.make_node("Conv", ["x", "wb"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["cat"], axis=1)]
    last = "cat"
    if pool:
        nodes.append(helper.make_node("AveragePool", ["cat"], ["pool"], kernel_shape=[2, 2]))
        last = "pool"
    if then_conv:
        init.append(numpy_helper.from_array((rng.standard_normal((2, 8, 1, 1)) * 0.5).astype(np.float32), "wc"))
        nodes.append(helper.make_node("Conv", [last, "wc"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "concat_tail", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("pool", [False, True])
def test_concat_and_average_pool_without_quantized_reader_stay_float(pool):
    """Without region outputs a Concat (or AveragePool) that only a model output reads
    computes in float, so its inputs get no pair that would only round them; read by a
    quantized Conv, or with region outputs or NPU rules, it stays quantized."""
    model = _concat_tail(then_conv=False, pool=pool)
    prepared = prepare(model)
    plan = build_plan(prepared, False, quantize_region_outputs=False)
    assert not {"a", "b", "cat", "pool"} & set(plan.activations)
    assert plan.skipped["Concat(cat)"].startswith("no quantized op reads its output")
    assert {"a", "b"} <= set(build_plan(prepared, False, quantize_region_outputs=True).activations)
    assert {"a", "b"} <= set(build_plan(prepared, True, quantize_region_outputs=False).activations)
    read = build_plan(prepare(_concat_tail(then_conv=True, pool=pool)), False, quantize_region_outputs=False)
    assert {"a", "b", "pool" if pool else "cat"} <= set(read.activations)

    x = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(np.float32)
    q = quantize_model(model, ArrayReader(x, "x", 2), get_preset("U8S8")).model
    assert not [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in ("a", "b", "cat")]
    reference = run(model, x)
    # only the Convs' int8 weights and input pair remain: no 8-bit rounding of the outputs
    assert rel_rms(run(q, x), reference) < 0.02
