"""Loop and Scan bodies are calibrated by stepping them on every iteration and quantized
by the main graph's rules (pyquant.graph.loops, pyquant.calibrate.loops); the state
carried between iterations and the scan outputs stay float unless tensor_types names
them; a body that cannot run by itself stays float with the reason."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyquant.api import as_reader, quantize_detailed
from pyquant.calibrate.loops import BodyCalibration
from pyquant.calibrate.runner import collect
from pyquant.config import QuantType, get_preset
from pyquant.datasource import ArraySource
from pyquant.graph.loops import extract_bodies
from pyquant.graph.plan import plan_for
from pyquant.preparation import prepare_graph
from pyquant.sharded import quantize_sharded

U8S8 = get_preset("U8S8")
# Quantized models against float on these tiny models, measured 36-43 dB (U8S8), 28-33 dB
# (XINT8's power-of-two scales); one bound for both with margin
MIN_SQNR_DB = 25.0
# the collectors' min/max are float32; the numpy loop runs in float64
STATISTICS_RTOL = 1e-5
LIMIT = 15.0  # the data-dependent loop stops once its state's maximum reaches this (2 to 4 trips)
MAX_TRIPS = 12


def const(name, array, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(array, dtype=dtype), name)


def loop_model(data_dependent: bool = False, trips: int = 3) -> onnx.ModelProto:
    """x -> Conv -> Relu -> h0 -> Loop[h = h + Relu(Conv(h / 2))] -> Conv -> y; with
    ``data_dependent`` the body's condition is max(h) < LIMIT (at most MAX_TRIPS)."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Mul", ["h_in", "half"], ["a"]),
             helper.make_node("Conv", ["a", "w_body", "b_body"], ["c"], name="body_conv"),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Add", ["h_in", "r"], ["h_out"])]
    if data_dependent:
        nodes += [helper.make_node("ReduceMax", ["h_out"], ["peak"], keepdims=0),
                  helper.make_node("Less", ["peak", "limit"], ["cond_out"])]
    else:
        nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    body = helper.make_graph(nodes, "body", [
        helper.make_tensor_value_info("i", TensorProto.INT64, []),
        helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 4, 6, 6])], [
        helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
        helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 4, 6, 6])])
    init = [const("w0", rng.normal(size=(4, 2, 1, 1))), const("half", 0.5),
            const("w_body", np.abs(rng.normal(size=(4, 4, 1, 1))) * 0.4), const("b_body", rng.normal(size=4) * 0.1),
            const("w_head", rng.normal(size=(3, 4, 1, 1))),
            const("trips", MAX_TRIPS if data_dependent else trips, np.int64)]
    if data_dependent:
        init += [const("limit", LIMIT), const("go", True, np.bool_)]
    graph = helper.make_graph([
        helper.make_node("Conv", ["x", "w0"], ["c0"]),
        helper.make_node("Relu", ["c0"], ["h0"]),
        helper.make_node("Loop", ["trips", "go" if data_dependent else "", "h0"], ["h_final"], name="steps", body=body),
        helper.make_node("Conv", ["h_final", "w_head"], ["y"])], "loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 6, 6])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def scan_model(steps: int = 5) -> onnx.ModelProto:
    """A recurrent cell over a sequence: r = Relu(x_t @ Wx); h = tanh(r + h); y_t = r @ Wy."""
    rng = np.random.default_rng(4)
    body = helper.make_graph([
        helper.make_node("MatMul", ["x_t", "wx"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("Add", ["r", "h_in"], ["s"]),
        helper.make_node("Tanh", ["s"], ["h_out"]),
        helper.make_node("MatMul", ["r", "wy"], ["y_t"])], "scan_body", [
        helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 16]),
        helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [1, 8])], [
        helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 16]),
        helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [1, 4])])
    graph = helper.make_graph(
        [helper.make_node("Scan", ["h0", "seq"], ["h_last", "ys"], name="rnn", num_scan_inputs=1, body=body)], "scan",
        [helper.make_tensor_value_info("seq", TensorProto.FLOAT, [steps, 1, 8]),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("h_last", TensorProto.FLOAT, [1, 16]),
         helper.make_tensor_value_info("ys", TensorProto.FLOAT, [steps, 1, 4])],
        [const("wx", rng.normal(size=(8, 16)) * 0.5), const("wy", rng.normal(size=(16, 4)) * 0.5)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def image_feeds(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, 2, 6, 6)).astype(np.float32)} for _ in range(n)]


def sequence_feeds(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [{"seq": rng.normal(size=(5, 1, 8)).astype(np.float32),
             "h0": (rng.normal(size=(1, 16)) * 0.1).astype(np.float32)} for _ in range(n)]


CASES = {"loop, constant trip count": (loop_model, image_feeds, "steps"),
         "loop, data-dependent condition": (lambda: loop_model(data_dependent=True), image_feeds, "steps"),
         "scan": (scan_model, sequence_feeds, "rnn")}


def run(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def sqnr_db(reference, value) -> float:
    reference = np.asarray(reference, np.float64)
    return float(10 * np.log10(np.sum(reference ** 2) / np.sum((reference - value) ** 2)))


def body_of(model, node: str) -> onnx.GraphProto:
    return next(n for n in model.graph.node if n.name == node).attribute[0].g


def quantized_inputs(graph: onnx.GraphProto):
    return {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("preset", ["U8S8", "XINT8"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_body_is_quantized_and_the_model_stays_close_to_float(case, preset):
    build, make_feeds, node = CASES[case]
    model = build()
    result = quantize_detailed(model, make_feeds(16), get_preset(preset))
    q = result.model
    onnx.checker.check_model(q, full_check=True)
    body = body_of(q, node)
    ops = [n.op_type for n in body.node]
    assert ops.count("QuantizeLinear") >= 1 and ops.count("DequantizeLinear") >= 2  # an activation and a weight
    assert any(t.data_type == TensorProto.INT8 for t in body.initializer)  # the body's weight, int8
    # the carried state and the scan outputs stay float
    assert not quantized_inputs(body) & {"h_in", "h_out", "y_t"}
    assert "recurrent state stays float" in result.report.float_tensors["h_out"]
    assert node not in result.report.float_nodes  # the node's body is quantized
    assert result.report.weights > len(result.plan.weights)  # the body's weights counted in
    assert result.report.activations > len(result.plan.activations)
    for feed in make_feeds(4, seed=1):
        for reference, value in zip(run(model, feed), run(q, feed)):
            assert sqnr_db(reference, value) > MIN_SQNR_DB


def test_a_body_left_float_by_the_configuration_is_exactly_the_float_body():
    model = loop_model()
    config = dataclasses.replace(U8S8, nodes_to_exclude=frozenset({"steps"}))
    result = quantize_detailed(model, image_feeds(8), config)
    assert list(body_of(result.model, "steps").node) == list(body_of(model, "steps").node)
    assert result.report.float_nodes["steps"] == "excluded by the configuration"


def test_nodes_to_exclude_and_tensor_types_reach_the_body():
    """A body node named in nodes_to_exclude stays float; the carried state named in
    tensor_types (in and out: the Add that carries it reads one and writes the other) is
    quantized."""
    model = loop_model()
    config = dataclasses.replace(U8S8, nodes_to_exclude=frozenset({"body_conv"}))
    result = quantize_detailed(model, image_feeds(8), config)
    body = body_of(result.model, "steps")
    conv = next(n for n in body.node if n.name == "body_conv")
    assert conv.input[0] == "a" and conv.input[1] == "w_body"  # float inputs, float weight
    assert result.report.float_nodes["steps/body_conv"] == "excluded by the configuration (nodes_to_exclude)"

    xint8 = get_preset("XINT8")
    plain = quantize_detailed(model, image_feeds(8), xint8).model
    assert not {"h_in", "h_out"} & quantized_inputs(body_of(plain, "steps"))
    state = {"h_in": QuantType.QInt8, "h_out": QuantType.QInt8}
    asked = quantize_detailed(model, image_feeds(8), dataclasses.replace(xint8, tensor_types=state)).model
    body = body_of(asked, "steps")
    assert "h_in" in quantized_inputs(body)
    assert any(n.op_type == "DequantizeLinear" and n.output[0] == "h_out" for n in body.node)  # the body output


def conv1x1(x, w, b=None):
    y = np.einsum("nchw,oc->nohw", x, w[:, :, 0, 0])
    return y if b is None else y + b[None, :, None, None]


def loop_by_hand(model, feed, data_dependent: bool):
    """Every iteration's values of the body tensors a and r, computed in numpy."""
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    h = np.maximum(conv1x1(feed["x"].astype(np.float64), weights["w0"]), 0)
    values = {"a": [], "r": []}
    for _ in range(MAX_TRIPS if data_dependent else int(weights["trips"])):
        a = h * 0.5
        r = np.maximum(conv1x1(a, weights["w_body"], weights["b_body"]), 0)
        values["a"].append(a)
        values["r"].append(r)
        h = h + r
        if data_dependent and not h.max() < LIMIT:
            break
    return values


def body_statistics(model, feeds, config=U8S8):
    """The collectors of the body's planned activations after the calibration pass."""
    prepared, report = prepare_graph(model, feeds[:1])
    bodies, _ = extract_bodies(prepared, report.control_flow_left)
    # the statistics of every body tensor the stepping can see, as the plan would have them
    calibrations = [BodyCalibration(b, dataclasses.replace(plan_for(b.model, config), activations=[
        t for t in ("a", "r", "x_t") if t in {o for n in b.model.graph.node for o in n.output} | set(b.inputs)]))
        for b in bodies]
    statistics = collect(prepared, plan_for(prepared, config), as_reader(feeds, prepared), config, loops=calibrations)
    return statistics


@pytest.mark.parametrize("data_dependent", [False, True])
def test_loop_statistics_match_the_loop_run_by_hand(data_dependent):
    model = loop_model(data_dependent)
    feeds = image_feeds(6, seed=2)
    statistics = body_statistics(model, feeds)
    by_hand = [loop_by_hand(model, f, data_dependent) for f in feeds]
    trips = [len(v["a"]) for v in by_hand]
    if data_dependent:  # the data decides the trip count, and the samples differ in it
        assert len(set(trips)) > 1 and max(trips) < MAX_TRIPS
    collectors = statistics.bodies["steps"]
    for name in ("a", "r"):
        values = np.concatenate([np.ravel(v) for sample in by_hand for v in sample[name]])
        c = collectors[name]
        assert c.count == values.size == sum(trips) * 4 * 6 * 6  # every iteration of every batch
        np.testing.assert_allclose([c.min, c.max], [values.min(), values.max()], rtol=STATISTICS_RTOL)
        assert c.hist.sum() == values.size


def test_scan_statistics_match_the_scan_run_by_hand():
    model = scan_model()
    feeds = sequence_feeds(4, seed=3)
    collectors = body_statistics(model, feeds).bodies["rnn"]
    wx = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    r = np.concatenate([np.maximum(f["seq"].astype(np.float64) @ wx, 0).ravel() for f in feeds])
    x = np.concatenate([f["seq"].ravel() for f in feeds])
    for name, values in (("r", r), ("x_t", x)):
        c = collectors[name]
        assert c.count == values.size
        np.testing.assert_allclose([c.min, c.max], [values.min(), values.max()], rtol=STATISTICS_RTOL)


def sequence_loop_model() -> onnx.ModelProto:
    """A Loop that collects a Conv's outputs in a sequence (its carried state is not a tensor)."""
    body = helper.make_graph([
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("SequenceInsert", ["seq_in", "c"], ["seq_out"])], "collect", [
        helper.make_tensor_value_info("i", TensorProto.INT64, []),
        helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        helper.make_tensor_sequence_value_info("seq_in", TensorProto.FLOAT, None)], [
        helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
        helper.make_tensor_sequence_value_info("seq_out", TensorProto.FLOAT, None)])
    graph = helper.make_graph([
        helper.make_node("SequenceEmpty", [], ["empty"], dtype=TensorProto.FLOAT),
        helper.make_node("Loop", ["trips", "", "empty"], ["collected"], name="collect", body=body),
        helper.make_node("ConcatFromSequence", ["collected"], ["y"], axis=0)], "sequence_loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 6, 6])],
        [const("w", np.random.default_rng(5).normal(size=(3, 2, 1, 1))), const("trips", 2, np.int64)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_body_that_cannot_run_by_itself_stays_float_with_the_reason():
    model = sequence_loop_model()
    result = quantize_detailed(model, image_feeds(4), U8S8)
    assert result.report.float_nodes["collect"] == ("Loop body cannot be run by itself for calibration: its body "
                                                    "input 'seq_in' is not a typed tensor")
    assert list(body_of(result.model, "collect").node) == list(body_of(model, "collect").node)
    feed = image_feeds(1, seed=4)[0]
    np.testing.assert_array_equal(run(result.model, feed)[0], run(model, feed)[0])


def test_a_body_of_carried_state_only_is_stepped_and_left_as_it_is():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Mul", ["acc_in", "two"], ["acc_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1, 3, 4, 4])])
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]),
                               helper.make_node("Loop", ["trips", "", "c"], ["looped"], name="twice", body=body),
                               helper.make_node("Relu", ["looped"], ["y"])], "loop",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [const("w", np.random.default_rng(6).normal(size=(3, 2, 1, 1))), const("two", 2.0),
                               const("trips", 2, np.int64)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = np.random.default_rng(7).normal(size=(8, 1, 2, 4, 4)).astype(np.float32)
    result = quantize_detailed(model, [{"x": d} for d in data], U8S8)
    assert "QuantizeLinear" not in [n.op_type for n in body_of(result.model, "twice").node]
    assert "recurrent state stays float" in result.report.float_tensors["acc_out"]
    x = {"x": data[0]}
    assert sqnr_db(run(model, x)[0], run(result.model, x)[0]) > MIN_SQNR_DB


def gated_loop_model() -> onnx.ModelProto:
    """x -> Conv -> Relu -> feat; If(sum(x) > -1e9) then [Loop(3) of h = Loop(2)[h / 2](h +
    Relu(Conv(feat))) -> Conv] else [Conv]: a Loop in an If branch, whose body reads a
    main-graph activation and holds a Loop of its own."""
    rng = np.random.default_rng(8)
    inner = helper.make_graph([helper.make_node("Identity", ["ci"], ["co"]),
                               helper.make_node("Mul", ["z_in", "half"], ["z_out"])], "inner", [
        helper.make_tensor_value_info("j", TensorProto.INT64, []),
        helper.make_tensor_value_info("ci", TensorProto.BOOL, []),
        helper.make_tensor_value_info("z_in", TensorProto.FLOAT, [1, 4, 6, 6])], [
        helper.make_tensor_value_info("co", TensorProto.BOOL, []),
        helper.make_tensor_value_info("z_out", TensorProto.FLOAT, [1, 4, 6, 6])])
    body = helper.make_graph([
        helper.make_node("Conv", ["feat", "w_body"], ["fc"]),
        helper.make_node("Relu", ["fc"], ["fr"]),
        helper.make_node("Add", ["h_in", "fr"], ["s"]),
        helper.make_node("Loop", ["two", "", "s"], ["h_out"], name="inner_loop", body=inner),
        helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body", [
        helper.make_tensor_value_info("i", TensorProto.INT64, []),
        helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 4, 6, 6])], [
        helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
        helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 4, 6, 6])])
    then = helper.make_graph([helper.make_node("Loop", ["trips", "", "feat"], ["h_final"], name="steps", body=body),
                              helper.make_node("Conv", ["h_final", "w_head"], ["yt"])], "then", [],
                             [helper.make_tensor_value_info("yt", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Conv", ["feat", "w_head"], ["ye"])], "else", [],
                              [helper.make_tensor_value_info("ye", TensorProto.FLOAT, None)])
    graph = helper.make_graph([
        helper.make_node("Conv", ["x", "w0"], ["c0"]), helper.make_node("Relu", ["c0"], ["feat"]),
        helper.make_node("ReduceSum", ["x"], ["sx"], keepdims=0),
        helper.make_node("Greater", ["sx", "floor"], ["flag"]),
        helper.make_node("If", ["flag"], ["y"], name="gate", then_branch=then, else_branch=other)], "gated",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 6, 6])],
        [const("w0", rng.normal(size=(4, 2, 1, 1))), const("w_body", rng.normal(size=(4, 4, 1, 1)) * 0.3),
         const("w_head", rng.normal(size=(3, 4, 1, 1))), const("half", 0.5), const("floor", -1e9),
         const("trips", 3, np.int64), const("two", 2, np.int64)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_loop_in_an_if_branch_reading_the_main_graph_with_a_nested_loop():
    model = gated_loop_model()
    result = quantize_detailed(model, image_feeds(8), U8S8)
    q = result.model
    onnx.checker.check_model(q, full_check=True)
    gate = next(n for n in q.graph.node if n.op_type == "If")
    then = next(a.g for a in gate.attribute if a.name == "then_branch")
    body = next(n for n in then.node if n.op_type == "Loop").attribute[0].g
    assert "feat" in quantized_inputs(body)  # the main-graph activation, quantized where the body reads it
    assert "h_in" not in quantized_inputs(body)
    assert "only top-level bodies are stepped" in result.report.float_nodes["steps/inner_loop"]
    for feed in image_feeds(3, seed=5):
        assert sqnr_db(run(model, feed)[0], run(q, feed)[0]) > MIN_SQNR_DB


def test_a_body_whose_stepping_does_not_reproduce_the_node_stays_float(monkeypatch):
    monkeypatch.setattr("pyquant.calibrate.loops.STATE_MATCH_RTOL", -1.0)  # no final state can match
    model = loop_model()
    result = quantize_detailed(model, image_feeds(4), U8S8)
    assert result.report.float_nodes["steps"] == (
        "Loop body stays float: stepping its body did not reproduce its output 'h_final' in calibration batch 0 "
        "(after 3 iterations)")
    assert list(body_of(result.model, "steps").node) == list(body_of(model, "steps").node)


def test_a_body_declared_for_batch_1_is_stepped_on_batches_of_4():
    """onnxruntime's Loop runs a body whose declared sizes are the export's (batch 1) on
    any batch; the standalone body keeps the ranks and frees the sizes."""
    model = loop_model()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    rng = np.random.default_rng(9)
    feeds = [{"x": rng.normal(size=(4, 2, 6, 6)).astype(np.float32)} for _ in range(4)]
    result = quantize_detailed(model, feeds, U8S8)
    assert "steps" not in result.report.float_nodes
    assert "QuantizeLinear" in [n.op_type for n in body_of(result.model, "steps").node]
    assert sqnr_db(run(model, feeds[0])[0], run(result.model, feeds[0])[0]) > MIN_SQNR_DB


def test_sharded_calibration_leaves_the_body_float_with_the_reason():
    data = np.concatenate([f["x"] for f in image_feeds(8)])
    result = quantize_sharded(loop_model(), ArraySource(data, "x", batch_size=1), "U8S8", shards=2)
    assert result.report.float_nodes["steps"] == \
        "Loop body stays float: sharded calibration does not step Loop/Scan bodies"
    assert "QuantizeLinear" not in [n.op_type for n in body_of(result.model, "steps").node]


def test_tensor_types_of_a_main_graph_activation_reach_the_body_that_reads_it():
    """'feat' is computed in the main graph and read inside the Loop body: a type given
    to it applies in both (its pair in the main graph sits in the If branch after folding,
    the body's pair on it is 16-bit too)."""
    config = dataclasses.replace(get_preset("XINT8"), tensor_types={"feat": QuantType.QInt16})
    q = quantize_detailed(gated_loop_model(), image_feeds(8), config).model
    gate = next(n for n in q.graph.node if n.op_type == "If")
    then = next(a.g for a in gate.attribute if a.name == "then_branch")
    body = next(n for n in then.node if n.op_type == "Loop").attribute[0].g
    scales = {t.name: t for g in (q.graph, then, body) for t in g.initializer}
    for graph in (then, body):
        pair = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "feat")
        assert scales[pair.input[2]].data_type == TensorProto.INT16
