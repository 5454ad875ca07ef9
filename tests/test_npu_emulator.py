"""npu-sim (pyquant.npu.emulator) against a plain numpy integer interpreter
(tests/npu_reference.py), bit for bit, on small QDQ graphs with every supported op, in
every rounding mode."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import npu_reference
import pyquant
from pyquant.npu.emulator import emulate
from pyquant.npu.rules import GENERATIONS, PHOENIX, Rounding


class QdqGraph:
    """A QDQ model written by hand: every scale a power of two chosen by the test."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes, self.inits, self.n = [], [], 0
        self.rng = np.random.default_rng(seed)

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}{self.n}"

    def const(self, array, hint: str = "c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op: str, inputs, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def qdq(self, x: str, p: int, zp: int = 0, dtype=np.uint8) -> str:
        scale, zero = self.const(np.float32(2.0 ** -p), "s"), self.const(np.array(zp, dtype), "z")
        q = self.op("QuantizeLinear", [x, scale, zero])
        return self.op("DequantizeLinear", [q, scale, zero])

    def weight(self, shape, p: int, dtype=np.int8) -> str:
        info = np.iinfo(dtype)
        q = self.const(self.rng.integers(info.min, info.max + 1, shape).astype(dtype), "w")
        return self.op("DequantizeLinear", [q, self.const(np.float32(2.0 ** -p), "s"), self.const(np.array(0, dtype), "z")])

    def bias(self, n: int, p: int, int32: bool) -> str:
        dtype = np.int32 if int32 else np.int8
        values = self.rng.integers(-2000 if int32 else -128, 2000 if int32 else 128, n).astype(dtype)
        return self.op("DequantizeLinear", [self.const(values, "b"), self.const(np.float32(2.0 ** -p), "s"),
                                            self.const(np.array(0, dtype), "z")])

    def model(self, shape, output: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [onnx.ValueInfoProto(name=output)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model)
        model.graph.output[0].CopyFrom(next(v for v in model.graph.value_info if v.name == output))
        onnx.checker.check_model(model)
        return model


def conv_graph() -> onnx.ModelProto:
    """Conv 3x3 (int8 bias), Relu, depthwise Conv (int32 bias), Clip(0, 6), strided 1x1
    Conv, grouped Conv, residual Add, MaxPool, AveragePool, GlobalAveragePool, Flatten, Gemm."""
    g = QdqGraph(1)
    x = g.qdq("x", 5, 128)
    c1 = g.op("Conv", [x, g.weight((8, 4, 3, 3), 8), g.bias(8, 7, int32=False)], pads=[1, 1, 1, 1])
    r1 = g.qdq(g.op("Relu", [c1]), 4)
    c2 = g.op("Conv", [r1, g.weight((8, 1, 3, 3), 7), g.bias(8, 11, int32=True)], pads=[1, 1, 1, 1], group=8)
    r2 = g.qdq(g.op("Clip", [c2, g.const(np.float32(0)), g.const(np.float32(6))]), 5)
    c3 = g.qdq(g.op("Conv", [r2, g.weight((8, 8, 1, 1), 7)], strides=[1, 1]), 4, 128)
    c4 = g.qdq(g.op("Conv", [c3, g.weight((8, 2, 3, 3), 8)], pads=[1, 1, 1, 1], group=4), 3, 128)
    a = g.qdq(g.op("Add", [c4, r1]), 3, 128)
    mp = g.qdq(g.op("MaxPool", [a], kernel_shape=[2, 2], strides=[2, 2]), 3, 128)
    ap = g.qdq(g.op("AveragePool", [mp], kernel_shape=[3, 3], strides=[1, 1]), 5, 128)
    gap = g.qdq(g.op("GlobalAveragePool", [ap]), 6, 128)
    flat = g.qdq(g.op("Flatten", [gap]), 6, 128)
    y = g.qdq(g.op("Gemm", [flat, g.weight((5, 8), 7), g.bias(5, 9, int32=False)], transB=1), 3, 128)
    return g.model([2, 4, 10, 10], y)


def elementwise_graph() -> onnx.ModelProto:
    """LeakyRelu, Mul, HardSigmoid, HardSwish, Concat, ReduceMean, Transpose, Reshape,
    Slice, Pad, MatMul, Add of two positions."""
    g = QdqGraph(2)
    x = g.qdq("x", 4, 128)
    lr = g.qdq(g.op("LeakyRelu", [x], alpha=0.1), 5, 128)
    m = g.qdq(g.op("Mul", [x, lr]), 3, 128)
    hs = g.qdq(g.op("HardSigmoid", [m], alpha=1 / 6, beta=0.5), 7)
    hw = g.qdq(g.op("HardSwish", [x]), 5, 128)
    add = g.qdq(g.op("Add", [hs, hw]), 5, 128)
    cat = g.qdq(g.op("Concat", [add, lr], axis=1), 5, 128)
    rm = g.qdq(g.op("ReduceMean", [cat], axes=[2, 3], keepdims=1), 7, 128)
    t = g.op("Transpose", [cat], perm=[0, 2, 3, 1])
    s = g.op("Slice", [t, g.const(np.array([1], np.int64)), g.const(np.array([5], np.int64)),
                       g.const(np.array([1], np.int64))])
    p = g.op("Pad", [s, g.const(np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64))])
    r = g.qdq(g.op("Reshape", [p, g.const(np.array([2, -1, 6], np.int64))]), 5, 128)
    mm = g.qdq(g.op("MatMul", [r, g.weight((6, 3), 6)]), 3, 128)
    return g.model([2, 3, 6, 6], g.qdq(g.op("Concat", [g.op("Flatten", [mm]), g.op("Flatten", [rm])], axis=1), 3, 128))


def with_quantized_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every QuantizeLinear output as a graph output too (to compare each rounding)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for name in npu_reference.quantized_outputs(model):
        out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.UINT8, None))
    return out


def run_emulated(model: onnx.ModelProto, feed, rounding: Rounding, generation: str = "phoenix"):
    emulation = emulate(model, generation, rounding)
    session = ort.InferenceSession(emulation.model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in emulation.model.graph.output]
    return emulation, dict(zip(names, session.run(None, feed)))


def feed(model: onnx.ModelProto, seed: int, scale: float = 4.0):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)}


@pytest.mark.parametrize("graph", [conv_graph, elementwise_graph])
@pytest.mark.parametrize("rounding", list(Rounding))
def test_emulator_matches_the_integer_reference_bit_for_bit(graph, rounding):
    model = with_quantized_outputs(graph())
    for seed in range(3):
        x = feed(model, seed)
        emulation, got = run_emulated(model, x, rounding)
        assert not emulation.float_nodes, emulation.describe()
        expected = npu_reference.run(model, x, PHOENIX, rounding)
        for name in npu_reference.quantized_outputs(model):
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{name} ({rounding.value})")
        final = model.graph.output[0].name
        ref = expected[final]
        np.testing.assert_array_equal(got[final], (ref.v.astype(np.float64) * 2.0 ** -ref.p).astype(np.float32))


def test_rounding_modes_differ_and_generations_pick_theirs():
    """The test above could not tell the modes apart if no tie were ever rounded."""
    model = with_quantized_outputs(conv_graph())
    x = feed(model, 0)
    results = {r: run_emulated(model, x, r)[1] for r in Rounding}
    names = npu_reference.quantized_outputs(model)
    for a, b in [(Rounding.HALF_UP, Rounding.HALF_EVEN), (Rounding.HALF_UP, Rounding.HALF_AWAY)]:
        assert any(not np.array_equal(results[a][n], results[b][n]) for n in names)
    assert emulate(model, "strix").rounding is Rounding.HALF_EVEN
    assert emulate(model).rounding is Rounding.HALF_UP is GENERATIONS["hawk-point"].rounding


def test_the_npu_approximations_are_applied_once():
    """A graph that already carries the NPU's constants (alpha = k/256, slope 2731/2^14) is
    computed the same as one with the exact constants, not approximated twice."""
    outputs = []
    for alpha, slope in [(0.1, 1 / 6), (26 / 256, 2731 / 2 ** 14)]:
        g = QdqGraph(3)
        x = g.qdq("x", 4, 128)
        lr = g.qdq(g.op("LeakyRelu", [x], alpha=alpha), 6, 128)
        y = g.qdq(g.op("HardSigmoid", [lr], alpha=slope, beta=0.5), 8)
        model = g.model([1, 2, 4, 4], y)
        outputs.append(run_emulated(model, feed(model, 1), Rounding.HALF_UP)[1][y])
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_unsupported_ops_run_in_float_and_are_listed():
    g = QdqGraph(4)
    x = g.qdq("x", 4, 128)
    y = g.qdq(g.op("Sigmoid", [x]), 8)
    model = g.model([1, 2, 3, 3], y)
    emulation, got = run_emulated(model, feed(model, 0), Rounding.HALF_UP)
    assert len(emulation.float_nodes) == 1 and "lookup table" in emulation.describe()
    cpu = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed(model, 0))[0]
    assert np.max(np.abs(got[y] - cpu)) <= 2.0 ** -8  # at most one step apart (rounding mode)


def test_a_pyquant_xint8_model_runs_in_npu_arithmetic(tiny_model, tiny_data):
    """The whole path: pyquant's XINT8 QDQ model, emulated, equals the integer reference."""
    q = pyquant.quantize(tiny_model, tiny_data, "XINT8")
    model = with_quantized_outputs(q)
    x = {"x": tiny_data[:4]}
    emulation, got = run_emulated(model, x, Rounding.HALF_UP)
    assert not emulation.float_nodes, emulation.describe()
    expected = npu_reference.run(model, x, PHOENIX, Rounding.HALF_UP)
    for name in npu_reference.quantized_outputs(model):
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_a_float_model_is_refused_and_float_scales_are_listed(tiny_model, tiny_data):
    with pytest.raises(pyquant.PyquantError, match="QDQ"):
        emulate(tiny_model)
    emulation = emulate(pyquant.quantize(tiny_model, tiny_data, "U8S8"))
    assert "not a single power of two" in emulation.describe()
    assert any(name.endswith("QuantizeLinear") for name in emulation.float_nodes)
