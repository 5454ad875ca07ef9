"""Asymmetric uint8 weights (Quark's U8U8_AAWA) and bfloat16 (Quark's BF16): what the
written model holds, that onnxruntime runs it, and the options each refuses."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import pyquant
from pyquant.config import FastFinetuneOptions, PowerOfTwoMethod, QuantType, get_preset
from pyquant.errors import ConfigError
from pyquant.pipeline import prepare
from pyquant.qparams import bfloat16_bits, round_to_bfloat16


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def ort_bfloat16_round_trip(x: np.ndarray) -> np.ndarray:
    nodes = [helper.make_node("Cast", ["x"], ["b"], to=TensorProto.BFLOAT16),
             helper.make_node("Cast", ["b"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    return run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), x)


def test_bfloat16_rounding_is_onnxruntimes_cast_bit_for_bit():
    rng = np.random.default_rng(0)
    random = (rng.normal(size=20000) * 10.0 ** rng.integers(-40, 38, 20000)).astype(np.float32)
    ties = np.array([1.00390625, 1.01171875, -1.00390625, 2.0 ** -130 * 1.5], dtype=np.float32)
    edges = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38, 1e-45, 1.1754942e-38],
                     dtype=np.float32)
    x = np.concatenate([random, ties, edges])
    ours, theirs = round_to_bfloat16(x), ort_bfloat16_round_trip(x)
    same = (ours.view(np.uint32) == theirs.view(np.uint32)) | (np.isnan(ours) & np.isnan(theirs))
    assert same.all(), x[~same][:5]
    assert round_to_bfloat16(np.zeros((0, 3), np.float32)).shape == (0, 3)
    strided = x[::3]
    assert np.array_equal(round_to_bfloat16(strided).view(np.uint32), ours[::3].view(np.uint32))


def test_bf16_writes_cast_pairs_and_bfloat16_weights(tiny_model, tiny_data):
    model = pyquant.quantize(tiny_model, tiny_data, "BF16")
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops and "Cast" in ops
    to_bf16 = [n for n in model.graph.node if n.op_type == "Cast" and n.attribute[0].i == TensorProto.BFLOAT16]
    assert to_bf16, "no activation is cast to bfloat16"
    prepared = prepare(tiny_model)  # BatchNormalization folded: the weights the run quantizes
    conv_weights = [n.input[1] for n in prepared.graph.node if n.op_type == "Conv"]
    bf16 = {i.name: i for i in model.graph.initializer if i.data_type == TensorProto.BFLOAT16}
    # each bfloat16 weight is the float weight rounded (ties to even)
    float_weights = {i.name: numpy_helper.to_array(i) for i in prepared.graph.initializer}
    for w in conv_weights:
        stored = bf16[f"{w}_quantized"]
        expected = bfloat16_bits(round_to_bfloat16(float_weights[w]))
        assert np.frombuffer(stored.raw_data, dtype=np.uint16).tolist() == expected.ravel().tolist()
    x = tiny_data[:4]
    reference, got = run(tiny_model, x), run(model, x)
    assert np.abs(got - reference).max() <= 0.02 * np.abs(reference).max()  # 8 significant bits
    assert not np.array_equal(got, reference)


@pytest.mark.parametrize("fields,message", [
    ({"activation_type": QuantType.BFloat16}, "activations and weights together"),
    ({"per_channel": True}, "per_channel: not with bfloat16"),
    ({"fast_finetune": FastFinetuneOptions()}, "fast_finetune: not with bfloat16"),
    ({"calibrate_method": PowerOfTwoMethod.MinMSE}, "calibrate_method"),
    ({"enable_npu_cnn": True}, "enable_npu_cnn"),
])
def test_bfloat16_refuses_what_it_cannot_mean(fields, message):
    base = get_preset("BF16") if "activation_type" not in fields else get_preset("U8S8")
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(base, **fields)


@pytest.mark.parametrize("per_channel", [False, True])
def test_uint8_weights_are_asymmetric_with_the_range_of_each_tensor_or_channel(tiny_model, tiny_data, per_channel):
    config = dataclasses.replace(get_preset("U8S8"), weight_type=QuantType.QUInt8, per_channel=per_channel)
    result = pyquant.api.quantize_detailed(tiny_model, tiny_data, config)
    float_weights = {i.name: numpy_helper.to_array(i) for i in prepare(tiny_model).graph.initializer}
    checked = 0
    for (name, axis), entry in result.table.weights.items():
        w = float_weights[name].astype(np.float64)
        assert entry.quantized.dtype == np.uint8 and entry.qparams.zero_point.dtype == np.uint8
        rows = w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        lo, hi = np.minimum(rows.min(axis=1), 0), np.maximum(rows.max(axis=1), 0)
        assert np.allclose(np.ravel(entry.qparams.scale), (hi - lo) / 255, rtol=1e-6)
        assert np.all(np.abs(entry.dequantized() - w) <= np.max(entry.qparams.scale) / 2 + 1e-7)
        scale = np.ravel(entry.qparams.scale).astype(np.float64)
        assert np.array_equal(np.ravel(entry.qparams.zero_point), np.clip(np.round(-lo / scale), 0, 255))
        checked += 1
    assert checked
    dq_types = {i.data_type for i in result.model.graph.initializer if i.name.endswith("_quantized")}
    assert TensorProto.UINT8 in dq_types
    x = tiny_data[:4]
    reference, got = run(tiny_model, x), run(result.model, x)
    assert np.abs(got - reference).max() <= 0.1 * np.abs(reference).max()


@pytest.mark.parametrize("fields,message", [
    ({"fast_finetune": FastFinetuneOptions()}, "fast finetune fits int8 weights"),
    ({"calibrate_method": PowerOfTwoMethod.MinMSE}, "cannot have power-of-two scales"),
    ({"weight_type": QuantType.QInt16}, "16-bit weights are not supported"),
])
def test_uint8_weights_refuse_what_they_cannot_do(fields, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(get_preset("U8S8"), **{"weight_type": QuantType.QUInt8, **fields})


def test_quark_u8u8_and_bf16_presets_give_those_models(tiny_model_path, tiny_data):
    from pyquant.quark import ModelQuantizer
    from pyquant.quark.quantization.config import Config, get_default_config

    for name, weight_dtype in (("U8U8_AAWA", TensorProto.UINT8), ("BF16", TensorProto.BFLOAT16)):
        config = get_default_config(name)
        model = ModelQuantizer(Config(global_quant_config=config)).quantize_model(
            str(tiny_model_path), None, pyquant.api.as_reader(tiny_data, onnx.load(tiny_model_path)))
        assert weight_dtype in {i.data_type for i in model.graph.initializer}, name


def test_quark_scripts_can_register_the_custom_op_library_before_a_bf16_model(tiny_model, tiny_data):
    """Quark's BF16 models need Quark's custom ops; pyquant's need none, and its
    get_library_path() is a library that registers none, so scripts run unchanged."""
    from pyquant.quark import get_library_path

    model = pyquant.quantize(tiny_model, tiny_data, "BF16")
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path(device="cpu"))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"x": tiny_data[:2]})[0], run(model, tiny_data[:2]))
    with pytest.raises(ConfigError, match="use device='cpu'"):
        get_library_path(device="cuda")
