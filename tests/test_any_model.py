"""Models that are not image CNNs: several inputs of integer dtypes, varying sequence
lengths, attention with a near-infinite mask, models already quantized in another format,
declared shapes that differ from the real ones; and non-image calibration data from the CLI
(.npz files and folders, module:function) with a JSON report."""
from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import pyquant
from pyquant.api import quantize_detailed
from pyquant.cli import main
from pyquant.errors import CalibrationError, ModelError
from pyquant.preparation import prepare_graph

VOCAB, DIM = 50, 16


def tiny_attention() -> onnx.ModelProto:
    """ids, mask (int64 [N, S]) -> embedding (Gather) -> q, k, v projections -> scores +
    (1 - mask) * -3.4e38 -> Softmax -> weighted v -> mean over S -> [N, DIM]."""
    rng = np.random.default_rng(0)
    init = {"emb": rng.standard_normal((VOCAB, DIM)), "wq": rng.standard_normal((DIM, DIM)) * 0.3,
            "wk": rng.standard_normal((DIM, DIM)) * 0.3, "wv": rng.standard_normal((DIM, DIM)) * 0.3,
            "bq": rng.standard_normal(DIM) * 0.1, "one": 1.0, "neg": -3.4e38, "axes1": None}
    tensors = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in init.items() if v is not None]
    tensors.append(numpy_helper.from_array(np.array([1], np.int64), "axes1"))
    tensors.append(numpy_helper.from_array(np.array([1], np.int64), "axes_mean"))
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
        helper.make_node("MatMul", ["e", "wq"], ["q0"]), helper.make_node("Add", ["q0", "bq"], ["q"]),
        helper.make_node("MatMul", ["e", "wk"], ["k"]), helper.make_node("MatMul", ["e", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "maskf"], ["inv"]), helper.make_node("Mul", ["inv", "neg"], ["bias"]),
        helper.make_node("Unsqueeze", ["bias", "axes1"], ["bias3"]),
        helper.make_node("Add", ["scores", "bias3"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["ctx"]),
        helper.make_node("ReduceMean", ["ctx", "axes_mean"], ["y"], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"]),
                                                   helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", "S"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", DIM])], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def text_feeds(count: int, seed: int = 0):
    """Batches of 4 sequences of varying length, the last tokens padded and masked."""
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(count):
        length = 5 + i % 4
        ids = rng.integers(0, VOCAB, (4, length)).astype(np.int64)
        mask = np.ones((4, length), np.int64)
        mask[:, length - 1 - i % 3:] = 0
        feeds.append({"ids": ids, "mask": mask})
    return feeds


def run(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("preset", ["XINT8", "U8S8", "A8W8"])
def test_attention_with_an_infinite_mask_quantizes_and_keeps_the_mask_float(preset):
    model = tiny_attention()
    result = quantize_detailed(model, text_feeds(12), preset)
    onnx.checker.check_model(result.model)
    plan = result.plan
    assert "neg" not in plan.activations + plan.constant_activations  # the -3.4e38 constant
    if preset == "XINT8":  # with NPU rules the Mul is quantized: its constant is refused by name
        assert plan.float_tensors["neg"].startswith("constant with near-infinite values")
    assert not {"bias", "bias3", "masked"} & set(plan.activations)  # near-infinite activations stay float
    if preset == "XINT8":  # the masked sum is quantized under NPU rules: calibration finds it near-infinite
        assert plan.float_tensors["bias3"].startswith("reached |x| = 3.4e+38 in calibration")
    held_out = text_feeds(6, seed=1)
    cos = []
    for feed in held_out:
        a, b = run(model, feed), run(result.model, feed)
        cos.append(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    assert np.min(np.concatenate(cos)) > 0.95


def test_embedding_tables_are_quantized_as_weights_per_row():
    result = quantize_detailed(tiny_attention(), text_feeds(4), pyquant.QuantConfig(per_channel=True))
    uses = {u.node.op_type: u for u in result.plan.weights}
    assert uses["Gather"].channel_axis == 0
    scale = {t.name: t for t in result.model.graph.initializer}["emb_DequantizeLinear_Output_pc_scale"]
    assert len(numpy_helper.to_array(scale)) == VOCAB
    assert result.model.graph.initializer  # int8 table
    table = {t.name: t for t in result.model.graph.initializer}["emb_quantized"]
    assert table.data_type == TensorProto.INT8


@pytest.mark.parametrize("op", ["ConvInteger", "MatMulInteger", "QLinearConv", "DynamicQuantizeLinear"])
def test_models_quantized_in_any_format_are_refused(op):
    node = helper.make_node(op, ["x"], ["y"])
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match=f"is a {op}: the model is already quantized"):
        pyquant.quantize(model, np.zeros((2, 1, 4), np.float32), "U8S8")


def test_a_nan_names_the_tensor_and_the_node_that_made_it():
    graph = helper.make_graph([helper.make_node("Log", ["x"], ["l"], name="the_log"),
                               helper.make_node("Relu", ["l"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = -np.ones((8, 4), np.float32)  # log(-1) = NaN
    with pytest.raises(CalibrationError, match="'l' \\(output of node the_log\\) has 32 NaN"):
        pyquant.quantize(model, data, pyquant.QuantConfig(quantize_region_outputs=True, enable_npu_cnn=True))


# ---- the CLI with non-image data ---------------------------------------------------------

@pytest.fixture
def attention_path(tmp_path):
    path = tmp_path / "attention.onnx"
    onnx.save(tiny_attention(), path)
    return path


def test_cli_quantizes_from_an_npz_file_and_writes_a_report(tmp_path, attention_path):
    feeds = text_feeds(1)
    ids = np.concatenate([np.random.default_rng(i).integers(0, VOCAB, (4, 7)) for i in range(4)])
    mask = np.ones_like(ids)
    mask[:, -2:] = 0  # padding: the masked scores reach -3.4e38
    np.savez(tmp_path / "calib.npz", ids=ids.astype(np.int32), mask=mask)  # int32 ids: cast losslessly
    out, report = tmp_path / "q.onnx", tmp_path / "report.json"
    assert main(["quantize", "--model_input", str(attention_path), "--model_output", str(out), "--calib_data",
                 str(tmp_path / "calib.npz"), "--config", "XINT8", "--report", str(report), "--quiet"]) == 0
    run(onnx.load(out), feeds[0])
    data = json.loads(report.read_text())
    assert data["float_tensors"]["bias3"].startswith("reached |x| = 3.4e+38 in calibration")
    assert data["reasons"] and data["compute_nodes"] == 5  # the five MatMuls
    assert "graph preparation" in data["preparation"]


def test_cli_reads_a_folder_of_npz_samples_of_varying_length(tmp_path, attention_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, feed in enumerate(text_feeds(6)):
        np.savez(folder / f"{i:03}.npz", ids=feed["ids"][0], mask=feed["mask"][0])  # one sample: no batch axis
    out = tmp_path / "q.onnx"
    assert main(["quantize", "--model_input", str(attention_path), "--model_output", str(out), "--calib_data",
                 str(folder), "--config", "XINT8", "--quiet"]) == 0
    onnx.checker.check_model(onnx.load(out))


def test_cli_takes_a_python_reader(tmp_path, attention_path, monkeypatch):
    (tmp_path / "my_text_data.py").write_text(textwrap.dedent("""
        import numpy as np

        def feeds():
            rng = np.random.default_rng(0)
            for length in (4, 6, 9):
                yield {"ids": rng.integers(0, 50, (2, length)), "mask": np.ones((2, length), np.int64)}
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_text_data", raising=False)
    out = tmp_path / "q.onnx"
    assert main(["quantize", "--model_input", str(attention_path), "--model_output", str(out), "--calib_data",
                 "my_text_data:feeds", "--config", "U8S8", "--quiet"]) == 0
    assert main(["quantize", "--model_input", str(attention_path), "--model_output", str(out), "--calib_data",
                 "my_text_data:nothing", "--quiet"]) == 1


@pytest.mark.parametrize("preset", ["U8S8", "XINT8"])
def test_recurrent_layers_compute_in_float_with_int8_weights(preset):
    rng = np.random.default_rng(0)
    hidden, features = 8, 5
    init = [numpy_helper.from_array((rng.standard_normal((1, 4 * hidden, features)) * 0.3).astype(np.float32), "W"),
            numpy_helper.from_array((rng.standard_normal((1, 4 * hidden, hidden)) * 0.3).astype(np.float32), "R"),
            numpy_helper.from_array((rng.standard_normal((1, 8 * hidden)) * 0.1).astype(np.float32), "B")]
    graph = helper.make_graph([helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=hidden)], "lstm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, "N", features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = [{"x": rng.standard_normal((6, 4, features)).astype(np.float32)} for _ in range(4)]
    result = quantize_detailed(model, data, preset)
    assert {(u.node.op_type, u.input_index) for u in result.plan.weights} == {("LSTM", 1), ("LSTM", 2)}
    assert "recurrent layer" in next(iter(result.plan.skipped.values()))
    tables = {t.name: t for t in result.model.graph.initializer}
    assert tables["W_quantized"].data_type == TensorProto.INT8 and tables["R_quantized"].data_type == TensorProto.INT8
    a, b = run(model, data[0]), run(result.model, data[0])
    assert np.max(np.abs(a - b)) < 0.05 * np.max(np.abs(a))  # float compute, int8 weights: a small change


@pytest.mark.parametrize("preset", ["U8S8", "XINT8"])
def test_recurrent_weights_computed_from_constants_are_weights(preset):
    # PyTorch's LSTM export reorders the gates in the graph: Slice/Concat/Unsqueeze on the
    # constant weight. Folded in preparation, they are int8 weights, not uint8 activations.
    rng = np.random.default_rng(1)
    hidden, features = 8, 5
    w = (rng.standard_normal((4 * hidden, features)) * 0.3).astype(np.float32)
    r = (rng.standard_normal((1, 4 * hidden, hidden)) * 0.3).astype(np.float32)
    gates = lambda name, src: [  # noqa: E731
        helper.make_node("Slice", [src, f"{name}_s{i}", f"{name}_e{i}", "axis0"], [f"{name}_g{i}"]) for i in range(4)]
    bounds = {f"w_{b}{i}": np.array([v], np.int64) for i, (s, e) in enumerate([(hidden, 2 * hidden), (0, hidden),
                                                                                   (2 * hidden, 3 * hidden),
                                                                                   (3 * hidden, 4 * hidden)])
              for b, v in (("s", s), ("e", e))}
    nodes = gates("w", "W0") + [helper.make_node("Concat", [f"w_g{i}" for i in range(4)], ["w_cat"], axis=0),
                                helper.make_node("Unsqueeze", ["w_cat", "axis0"], ["W"]),
                                helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=hidden)]
    init = [numpy_helper.from_array(w, "W0"), numpy_helper.from_array(r, "R"),
            numpy_helper.from_array(np.array([0], np.int64), "axis0")] + \
        [numpy_helper.from_array(v, k) for k, v in bounds.items()]
    graph = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, "N", features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = [{"x": rng.standard_normal((6, 4, features)).astype(np.float32)} for _ in range(4)]
    result = quantize_detailed(model, data, preset)
    assert {(u.node.op_type, u.input_index) for u in result.plan.weights} == {("LSTM", 1), ("LSTM", 2)}
    assert not any(n.op_type in ("Slice", "Concat") for n in result.model.graph.node)
    assert sum(n.op_type == "QuantizeLinear" for n in result.model.graph.node) == 0  # weights only, stored int8
    tables = {t.name: t for t in result.model.graph.initializer}
    assert tables["W_quantized"].data_type == TensorProto.INT8
    folded = numpy_helper.to_array(next(t for t in preparation_of(model, data).graph.initializer if t.name == "W"))
    np.testing.assert_array_equal(folded[0], np.concatenate([w[hidden:2 * hidden], w[:hidden], w[2 * hidden:]]))
    a, b = run(model, data[0]), run(result.model, data[0])
    assert np.max(np.abs(a - b)) < 0.05 * np.max(np.abs(a))


def preparation_of(model, data):
    prepared, report = prepare_graph(model, data[:1])
    assert report.changes["constant Slice/Concat/Reshape/... folded into initializers"] == 6
    return prepared
