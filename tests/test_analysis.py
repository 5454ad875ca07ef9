"""Layer sensitivity and automatic mixed precision on a tiny model with one layer made
sensitive on purpose."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from pyquant.analysis import PrecisionTarget, analyze_sensitivity, auto_mixed_precision
from pyquant.api import quantize_detailed
from pyquant.cli import main
from pyquant.config import get_preset
from pyquant.errors import ConfigError, DataError
from pyquant.graph.bypass import QdqLayers

WIDTH = 16
OUTLIER = 1000.0


def outlier_mlp() -> onnx.ModelProto:
    """x -> Gemm -> Relu -> Gemm "make_outlier" -> h2 -> Gemm "reads_outlier" -> Relu -> Gemm -> y.

    Channel 0 of h2 is OUTLIER (a bias) and the next layer ignores it (a zero weight row):
    the function is ordinary, but an 8-bit scale for h2 must hold OUTLIER and rounds the
    other channels (about 1) to zero. Only the layer reading h2 is sensitive, and 16 bits
    (or float) for its input fix it."""
    rng = np.random.default_rng(0)
    w1, w2, w3, w4 = (rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) / 4 for _ in range(4))
    w3[0, :] = 0.0
    b2 = np.zeros(WIDTH, np.float32)
    b2[0] = OUTLIER
    init = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"), (w4, "w4"), (b2, "b2"))]
    init.append(numpy_helper.from_array(np.full(WIDTH, 0.1, np.float32), "b1"))
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"], name="first"),
             helper.make_node("Relu", ["g1"], ["h1"], name="relu1"),
             helper.make_node("Gemm", ["h1", "w2", "b2"], ["h2"], name="make_outlier"),
             helper.make_node("Gemm", ["h2", "w3"], ["g3"], name="reads_outlier"),
             helper.make_node("Relu", ["g3"], ["h3"], name="relu3"),
             helper.make_node("Gemm", ["h3", "w4"], ["y"], name="last")]
    graph = helper.make_graph(nodes, "outlier_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, WIDTH])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    return rng.standard_normal((64, WIDTH)).astype(np.float32), rng.standard_normal((32, WIDTH)).astype(np.float32)


@pytest.fixture(scope="module")
def analyzed(data, tmp_path_factory):
    """The sensitivity of outlier_mlp under XINT8 and its HTML report (made once)."""
    calib, held_out = data
    result = analyze_sensitivity(outlier_mlp(), calib, "XINT8", held_out)
    html_path = tmp_path_factory.mktemp("report") / "report.html"
    result.write_html(html_path)
    return result, html_path


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_float_variants_are_exact(data):
    calib, held_out = data
    result = quantize_detailed(outlier_mlp(), calib, "XINT8", keep_float_model=True)
    layers = QdqLayers(result.model, result.float_model)
    names = [layer.name for layer in layers.layers]
    assert names[:4] == ["first", "make_outlier", "reads_outlier", "last"] and "output y" in names
    reads = layers.layers[names.index("reads_outlier")]
    assert reads.activations == ["h2"] and reads.weights == ["w3"]
    float_out = run(outlier_mlp(), held_out)
    # every layer reading float values is the float model again, bit for bit up to float order
    np.testing.assert_allclose(run(layers.float_everywhere(), held_out), float_out, rtol=1e-5, atol=1e-5)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in layers.float_everywhere().graph.node)
    # one layer in float changes the output; the quantized model is untouched by the variants
    assert not np.allclose(run(layers.with_float([reads]), held_out), run(result.model, held_out))
    # only its own rounded inputs remain: h2, w3 and the bias that bias correction gave the layer
    assert sum(n.op_type == "DequantizeLinear" for n in layers.only_quantized(reads).graph.node) == 3
    assert [i.kind for i in reads.inputs] == ["activation", "weight", "bias"]


def test_sensitivity_ranks_the_layer_made_sensitive_first(analyzed, tmp_path):
    result, html_path = analyzed
    ranked = result.ranked()
    assert ranked[0].layer.name == "reads_outlier"
    assert ranked[0].only_quantized.sqnr_db < 10.0
    assert all(s.only_quantized.sqnr_db > 20.0 for s in ranked[1:])
    # leaving it alone in float wins most of the loss back; the others win nothing like it
    by_name = {s.layer.name: s for s in result.layers}
    assert by_name["reads_outlier"].only_float.sqnr_db > result.quantized.sqnr_db + 15.0
    assert by_name["first"].only_float.sqnr_db < result.quantized.sqnr_db + 3.0
    assert result.quantized.kl > 0 and by_name["reads_outlier"].only_quantized.kl > by_name["first"].only_quantized.kl
    text = result.to_text()
    lines = text.splitlines()
    assert lines[0].startswith("Layer sensitivity") and lines[lines.index(next(x for x in lines if x.startswith("-  ")))
                                                           + 1].split()[1] == "reads_outlier"
    # the tensor report: h2 itself is computed exactly (error enters at its rounding), g3 is far off
    assert result.tensors.row("g3").metric("quantized") < 10.0
    assert result.histograms[0].tensor == "h2" and result.histograms[0].clip[1] >= OUTLIER
    assert result.weight_ranges[0].weight == "w3"
    json_path = tmp_path / "report.json"
    result.write_json(json_path)
    page = html_path.read_text()
    assert page.count("<img") == 2 + len(result.histograms) + len(result.weight_ranges)
    assert "data:image/png;base64," in page and "tensors along the network" in page
    saved = json.loads(json_path.read_text())
    assert saved["layers"]["rows"][0]["node"] == "first" and "g3" in {r["tensor"] for r in saved["tensors"]["rows"]}


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_a_browser(analyzed, tmp_path):
    _, html_path = analyzed
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2000", f"file://{html_path}"], check=True, timeout=120,
                   capture_output=True)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2000, 1200)
    assert (pixels < 128).mean() > 0.01  # text and plots drawn, not a blank page


def test_mixed_precision_promotes_the_sensitive_layer_to_int16(data):
    calib, held_out = data
    result = auto_mixed_precision(outlier_mlp(), calib, "XINT8", PrecisionTarget(min_sqnr_db=25.0), held_out)
    assert result.start.sqnr_db < 10.0
    assert result.met and result.final.sqnr_db >= 25.0
    assert [(p.layer, p.kind, p.tensors) for p in result.promotions] == [("reads_outlier", "int16", ("h2",))]
    assert dict(result.config.tensor_types) == {"h2": get_preset("XINT8").activation_type.QInt16}
    # standard 16-bit QDQ with a power-of-two scale (NPU-legal), the rest 8-bit; onnxruntime runs it
    model = result.model
    assert model.opset_import[0].version >= 21
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    zero_points = {n.input[0]: inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert zero_points["h2"].dtype == np.int16
    assert all(z.dtype in (np.uint8, np.int8) for name, z in zero_points.items() if name != "h2")
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert all(float(np.log2(s)) == round(float(np.log2(s))) for s in scales)
    out = run(model, held_out)
    ref = run(outlier_mlp(), held_out)
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((out - ref) ** 2)) == pytest.approx(result.final.sqnr_db, abs=0.01)


def test_mixed_precision_float_promotion_and_metric_target(data):
    calib, held_out = data
    ref_classes = run(outlier_mlp(), held_out).argmax(1)

    def agreement(model):
        return float(np.mean(run(model, held_out).argmax(1) == ref_classes))

    target = PrecisionTarget(max_metric_drop=0.0, evaluator=agreement, allow_float=True)
    result = auto_mixed_precision(outlier_mlp(), calib, "U8S8", target, held_out)
    assert result.float_metric == 1.0 and result.start.metric < 1.0
    assert result.met and result.final.metric == 1.0
    assert [p.layer for p in result.promotions] == ["reads_outlier"] and result.promotions[0].kind == "float"
    assert result.config.nodes_to_exclude == frozenset({"reads_outlier"})
    # met at the start: nothing promoted, one quantization
    easy = auto_mixed_precision(outlier_mlp(), calib, "U8S8", PrecisionTarget(min_sqnr_db=-100.0), held_out)
    assert easy.met and easy.promotions == [] and easy.quantizations == 1
    # the promotion budget is honoured
    capped = auto_mixed_precision(outlier_mlp(), calib, "XINT8", PrecisionTarget(min_sqnr_db=200.0), held_out,
                                  max_promotions=1)
    assert not capped.met and len(capped.promotions) == 1


def test_precision_target_is_checked():
    with pytest.raises(ConfigError, match="needs"):
        PrecisionTarget()
    with pytest.raises(ConfigError, match="together"):
        PrecisionTarget(max_metric_drop=0.01)
    with pytest.raises(ConfigError, match="sqnr:DB"):
        PrecisionTarget.parse("snr:3")
    with pytest.raises(ConfigError, match="evaluator"):
        PrecisionTarget.parse("drop:0.01")
    assert PrecisionTarget.parse("sqnr:30,cosine:0.99") == PrecisionTarget(min_sqnr_db=30.0, min_cosine=0.99)


def test_cli_analyze_and_mixed_precision(data, tmp_path, capsys, monkeypatch):
    calib, held_out = data
    model_path = tmp_path / "m.onnx"
    onnx.save(outlier_mlp(), model_path)
    np.save(tmp_path / "calib.npy", calib)
    np.save(tmp_path / "held.npy", held_out)
    code = main(["analyze", "--model_input", str(model_path), "--calib_data", str(tmp_path / "calib.npy"),
                 "--held_out", str(tmp_path / "held.npy"), "--output", str(tmp_path / "r.html"),
                 "--json", str(tmp_path / "r.json"), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[lines.index(next(x for x in lines if x.startswith("-  "))) + 1].split()[1] == "reads_outlier"
    assert (tmp_path / "r.html").exists() and json.loads((tmp_path / "r.json").read_text())["layers"]["rows"]
    code = main(["mixed_precision", "--model_input", str(model_path), "--model_output", str(tmp_path / "q.onnx"),
                 "--calib_data", str(tmp_path / "calib.npy"), "--held_out", str(tmp_path / "held.npy"),
                 "--target", "sqnr:25", "--quiet"])
    assert code == 0
    assert "reads_outlier" in capsys.readouterr().out
    q = onnx.load(tmp_path / "q.onnx")
    assert any(t.data_type == TensorProto.INT16 for t in q.graph.initializer)
    # a metric target through a user evaluator: agreement of the top class with the float model's
    (tmp_path / "agree_eval.py").write_text(
        "import numpy as np, onnxruntime as ort\n"
        f"X = np.load({str(tmp_path / 'held.npy')!r})\n"
        "def top(m):\n"
        "    s = ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider'])\n"
        "    return s.run(None, {'x': X})[0].argmax(1)\n"
        "REF = None\n"
        "def agreement(model):\n"
        "    global REF\n"
        "    REF = top(model) if REF is None else REF  # the first model evaluated is the float one\n"
        "    return float(np.mean(top(model) == REF))\n")
    monkeypatch.chdir(tmp_path)
    code = main(["mixed_precision", "--model_input", str(model_path), "--model_output", str(tmp_path / "q3.onnx"),
                 "--calib_data", str(tmp_path / "calib.npy"), "--held_out", str(tmp_path / "held.npy"),
                 "--target", "drop:0", "--evaluator", "agree_eval:agreement", "--allow_float", "--config", "U8S8",
                 "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "float reads_outlier" in out and "metric 1.0000" in out.splitlines()[-1]
    assert main(["mixed_precision", "--model_input", str(model_path), "--model_output", str(tmp_path / "q2.onnx"),
                 "--calib_data", str(tmp_path / "calib.npy"), "--target", "snr:3", "--quiet"]) == 2
    assert not (tmp_path / "q2.onnx").exists()


def test_cli_bad_input_is_one_line_and_writes_nothing(data, tmp_path, capsys):
    calib, _ = data
    model_path = tmp_path / "m.onnx"
    onnx.save(outlier_mlp(), model_path)
    np.save(tmp_path / "calib.npy", calib)
    np.save(tmp_path / "narrow.npy", calib[:, :8])
    common = ["--model_input", str(model_path), "--calib_data", str(tmp_path / "calib.npy"), "--quiet"]
    assert main(["analyze", *common, "--held_out", str(tmp_path / "narrow.npy"),
                 "--output", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "held-out data" in err and "'x'" in err and "Traceback" not in err
    assert not (tmp_path / "r.html").exists()
    assert main(["analyze", *common, "--output", str(tmp_path / "missing" / "r.html")]) == 1
    assert "missing" in capsys.readouterr().err
    assert main(["analyze", "--model_input", str(tmp_path / "nope.onnx"), "--calib_data",
                 str(tmp_path / "calib.npy"), "--quiet"]) != 0
    assert "nope.onnx" in capsys.readouterr().err


def test_one_shot_calibration_data(data):
    calib, held_out = data
    batches = lambda: ({"x": calib[i:i + 16]} for i in range(0, len(calib), 16))  # noqa: E731
    with pytest.raises(DataError, match="held_out"):  # it would be read twice
        analyze_sensitivity(outlier_mlp(), batches(), "XINT8")
    # mixed precision keeps a one-shot source in memory and quantizes from it as often as it needs
    result = auto_mixed_precision(outlier_mlp(), batches(), "XINT8", PrecisionTarget(min_sqnr_db=25.0), held_out)
    assert result.met and result.quantizations >= 2
