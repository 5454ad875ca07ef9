"""The per-layer report module shared by the sensitivity analysis and the NPU target."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyquant.layer_report import ErrorStats, LayerReport, LayerRow, compare, onnx_source, plot_along_network


def reference_stats(ref: np.ndarray, test: np.ndarray):
    ref, test = ref.astype(np.float64).ravel(), test.astype(np.float64).ravel()
    noise = np.sum((test - ref) ** 2)
    return 10 * np.log10(np.sum(ref ** 2) / noise), ref @ test / np.linalg.norm(ref) / np.linalg.norm(test)


def test_error_stats_match_numpy_and_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 3, 5, 5)).astype(np.float32)
    test = ref + rng.normal(scale=0.05, size=ref.shape).astype(np.float32)
    whole = ErrorStats().update(ref, test)
    sqnr, cos = reference_stats(ref, test)
    assert whole.sqnr_db == pytest.approx(sqnr, rel=1e-12)
    assert whole.cosine == pytest.approx(cos, rel=1e-12)
    halves = ErrorStats().update(ref[:2], test[:2]).merge(ErrorStats().update(ref[2:], test[2:]))
    assert halves.sqnr_db == pytest.approx(whole.sqnr_db, rel=1e-12)
    assert halves.max_abs_error == whole.max_abs_error
    assert ErrorStats().update(ref, ref).sqnr_db == math.inf
    with pytest.raises(Exception, match="shape"):
        ErrorStats().update(ref, test[:1])


def tiny_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.full((2, 2), 0.5, np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_compare_orders_rows_by_network_and_finds_the_first_divergence(tmp_path):
    model = tiny_model()
    reference = onnx_source(model, {"h": "h", "y": "y"})

    def noisy(feed):  # an error that enters at "y" only
        out = dict(reference(feed))
        out["y"] = out["y"] + 0.1
        return out
    feeds = [{"x": np.arange(4, dtype=np.float32).reshape(2, 2) + i} for i in range(3)]
    report = compare("t", model, reference, {"same": reference, "noisy": noisy}, feeds)
    assert [r.tensor for r in report.rows] == ["h", "y"]
    assert report.row("h").metric("same") == math.inf
    assert report.first_divergence("noisy", 40.0).tensor == "y"
    assert report.first_divergence("same", 40.0) is None
    assert report.ranked("noisy")[0].tensor == "y"
    text = report.to_text()
    assert "noisy sqnr_db" in text and "relu" not in text.split("\n")[0]
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["rows"][0]["errors"]["same"]["sqnr_db"] == "inf"


def test_html_embeds_the_figures_and_escapes_names(tmp_path):
    pytest.importorskip("matplotlib")
    row = LayerRow("a<b", "n", "Conv", 0, {"cpu": ErrorStats().update(np.ones(3), np.ones(3) * 1.1)})
    report = LayerReport("title", [row], ["cpu"], ["one line"])
    fig = plot_along_network(report)
    assert fig.png[:8] == b"\x89PNG\r\n\x1a\n"
    report.write_html(tmp_path / "r.html", [fig])
    page = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in page and "a&lt;b" in page and "<script" not in page
