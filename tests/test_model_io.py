"""Saving models: atomic writes, with and without an external data file."""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyquant.errors import OutputError
from pyquant.graph import model_io
from pyquant.graph.model_io import load_model, save_model


def conv_model() -> onnx.ModelProto:
    """Two Convs whose weights (9 KB and 18 KB) are large enough to go to external data,
    and a bias small enough to stay inside the .onnx."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.standard_normal((16, 3, 7, 7)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "w2"),
            numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[3, 3, 3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 8, 8])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def outputs_of(model_or_path, x):
    source = str(model_or_path) if isinstance(model_or_path, os.PathLike) else model_or_path.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


X = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("external_data", [False, True])
def test_saved_model_loads_and_runs_identically(tmp_path, external_data):
    model = conv_model()
    before = model.SerializeToString()
    out = tmp_path / "m.onnx"
    save_model(model, out, external_data=external_data)
    assert model.SerializeToString() == before  # the caller's model is left as it was
    expected = {"m.onnx", "m.onnx.data"} if external_data else {"m.onnx"}
    assert {p.name for p in tmp_path.iterdir()} == expected  # and no temporary file
    header = onnx.load(str(out), load_external_data=False)
    external = {t.name for t in header.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert external == ({"w1", "w2"} if external_data else set())
    if external_data:
        assert (tmp_path / "m.onnx.data").stat().st_size == (16 * 3 * 7 * 7 + 32 * 16 * 3 * 3) * 4
    np.testing.assert_array_equal(outputs_of(out, X), outputs_of(model, X))  # onnxruntime reads the files
    np.testing.assert_array_equal(outputs_of(load_model(out), X), outputs_of(model, X))


def test_overwriting_a_model_with_external_data_replaces_its_data(tmp_path):
    out = tmp_path / "m.onnx"
    save_model(conv_model(), out, external_data=True)
    other = conv_model()
    other.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.full((16, 3, 7, 7), 0.5, np.float32), "w1"))
    save_model(other, out, external_data=True)  # the data file is replaced, not appended to
    assert (tmp_path / "m.onnx.data").stat().st_size == (16 * 3 * 7 * 7 + 32 * 16 * 3 * 3) * 4
    np.testing.assert_array_equal(outputs_of(out, X), outputs_of(other, X))


class Interrupted(Exception):
    pass


def _fail_after_first_tensor(monkeypatch):
    """Make the external data writer raise after it has written one tensor."""
    real = model_io._write_tensor_data
    calls = []

    def write(data_file, raw):
        if calls:
            raise Interrupted("disk pulled out")
        calls.append(1)
        real(data_file, raw)

    monkeypatch.setattr(model_io, "_write_tensor_data", write)
    return calls


def _fail_when_renaming(monkeypatch, suffix):
    """Make the rename of the file ending in ``suffix`` into place raise."""
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(suffix):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(model_io.os, "replace", replace)


@pytest.mark.parametrize("failure", ["writing data", "renaming data", "renaming model"])
def test_a_failed_save_leaves_no_file_behind(tmp_path, monkeypatch, failure):
    folder = tmp_path / "out"
    folder.mkdir()
    model = conv_model()
    before = model.SerializeToString()
    if failure == "writing data":
        calls = _fail_after_first_tensor(monkeypatch)
        expected_error = Interrupted
    else:
        _fail_when_renaming(monkeypatch, ".data" if failure == "renaming data" else ".onnx")
        expected_error = OutputError
    with pytest.raises(expected_error):
        save_model(model, folder / "m.onnx", external_data=True)
    if failure == "writing data":
        assert calls == [1]  # it failed midway, with part of the data written
    assert list(folder.iterdir()) == []  # no .onnx, no .data, no temporary file
    assert model.SerializeToString() == before


def test_a_failed_save_keeps_the_previous_model_intact(tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    old = conv_model()
    save_model(old, out)  # an earlier result without external data
    _fail_after_first_tensor(monkeypatch)
    with pytest.raises(Interrupted):
        save_model(conv_model(), out, external_data=True)
    assert {p.name for p in tmp_path.iterdir()} == {"m.onnx"}
    np.testing.assert_array_equal(outputs_of(out, X), outputs_of(old, X))
