"""Distributed calibration and evaluation: shards collected apart and merged give the bits
of one pass, in this process and on Ray (local instance, tests/conftest.py ray_local)."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import pyquant
from pyquant.calibrate.runner import StatisticsRequest, collect
from pyquant.calibrate.sharded import ShardedCalibration
from pyquant.config import get_preset
from pyquant.datasource import ArraySource, shard_ranges
from pyquant.distributed import LocalExecutor, RayExecutor
from pyquant.errors import CalibrationError, ConfigError
from pyquant.graph.plan import plan_for
from pyquant.pipeline import prepare
from pyquant.sharded import evaluate_sharded, quantize_sharded


@pytest.mark.parametrize("samples,batch,shards", [(64, 8, 3), (61, 8, 4), (5, 8, 3), (100, 7, 1), (16, 8, 5)])
def test_shards_are_whole_batches_covering_the_data_in_order(samples, batch, shards):
    ranges = shard_ranges(samples, batch, shards)
    assert ranges[0][0] == 0 and ranges[-1][1] == samples
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(start % batch == 0 and stop > start for start, stop in ranges)
    assert len(ranges) == min(shards, -(-samples // batch))


def test_shard_count_must_be_positive():
    with pytest.raises(ConfigError, match="shards"):
        shard_ranges(10, 2, 0)


@pytest.mark.parametrize("preset", ["XINT8", "U8S8", "A8W8", "INT8_CLE"])
def test_sharded_calibration_is_bit_identical_whatever_the_shards(tiny_model, tiny_data, preset):
    source = ArraySource(tiny_data, "x", batch_size=8)
    one = quantize_sharded(tiny_model, source, preset, shards=1).model.SerializeToString()
    three = quantize_sharded(tiny_model, source, preset, shards=3).model.SerializeToString()
    assert one == three


def test_sharded_statistics_match_the_single_pass_where_its_grid_does_not_matter(tiny_model, tiny_data):
    """Ranges, counts and channel means are those of runner.collect bit for bit; the
    histograms hold every value (on the fixed grid [min, max])."""
    config = get_preset("U8S8")
    model = prepare(tiny_model)
    plan = plan_for(model, config)
    source = ArraySource(tiny_data, "x", batch_size=8)
    request = StatisticsRequest({plan.activations[0]: 1})
    local = collect(model, plan, source.reader(), config, request)
    sharded = ShardedCalibration(source, 3)(model, plan, None, config, request)
    assert sharded.batches == local.batches == 8
    for name, c in local.ranges.items():
        s = sharded.ranges[name]
        assert (s.min, s.max, s.count) == (c.min, c.max, c.count), name
        assert s.hist.sum() == s.count and (s.lo, s.hi) == (s.min, s.max), name
    for name, mean in local.channel_means.items():
        assert np.array_equal(sharded.channel_means[name].mean, mean.mean)


def test_sharded_calibration_on_ray_equals_one_local_pass(ray_local, tiny_model, tiny_data):
    source = ArraySource(tiny_data, "x", batch_size=8)
    executor = RayExecutor(cpus_per_task=1)
    for preset in ("XINT8", "U8S8"):
        local = quantize_sharded(tiny_model, source, preset, shards=1).model.SerializeToString()
        on_ray = quantize_sharded(tiny_model, source, preset, shards=4, executor=executor).model.SerializeToString()
        assert on_ray == local, preset


def test_a_nan_in_a_shard_on_ray_is_a_calibration_error_naming_the_batch(ray_local, tiny_model, tiny_data):
    data = tiny_data.copy()
    data[41, 0, 0, 0] = np.nan  # batch 5 of 8, in the third of four shards
    with pytest.raises(CalibrationError, match="'x'.*batch 5"):
        quantize_sharded(tiny_model, ArraySource(data, "x", batch_size=8), "XINT8", shards=4,
                         executor=RayExecutor())


def test_sharded_evaluation_equals_one_pass(ray_local, tiny_model, tiny_data):
    labels = np.arange(len(tiny_data)) % 10
    source = ArraySource(tiny_data, "x", batch_size=8, labels=labels)
    quantized = pyquant.quantize(tiny_model, tiny_data, "XINT8")
    whole = pyquant.evaluate(quantized, tiny_data, labels, batch_size=8)
    local = evaluate_sharded(quantized, source, shards=3, executor=LocalExecutor())
    on_ray = evaluate_sharded(quantized, source, shards=4, executor=RayExecutor())
    for result in (local, on_ray):
        assert (result.top1, result.top5, result.n) == (whole.top1, whole.top5, whole.n)
        assert np.array_equal(result.predictions, whole.predictions)
    assert on_ray.shards == 4


def test_fast_finetune_reads_the_whole_source_on_the_driver(tiny_model, tiny_data):
    """Fast finetune's second pass runs where the pipeline runs: still bit-identical."""
    config = dataclasses.replace(get_preset("XINT8"), fast_finetune=pyquant.config.FastFinetuneOptions(iterations=20))
    source = ArraySource(tiny_data, "x", batch_size=8)
    one = quantize_sharded(tiny_model, source, config, shards=1).model.SerializeToString()
    two = quantize_sharded(tiny_model, source, config, shards=2).model.SerializeToString()
    assert one == two


def if_model() -> onnx.ModelProto:
    """y = Conv(x) if max(x) > 0 else -x: preparation inlines the branch the data takes."""
    w = numpy_helper.from_array(np.random.default_rng(3).normal(size=(2, 2, 1, 1)).astype(np.float32), "w")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    then = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 2, 4, 4])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 2, 4, 4])])
    nodes = [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
             helper.make_node("Greater", ["m", "zero"], ["positive"]),
             helper.make_node("If", ["positive"], ["y"], name="sign_if", then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "if_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])], [w, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_every_shard_checks_that_its_batches_take_the_inlined_branch(ray_local):
    data = np.random.default_rng(5).uniform(-1, 1, (32, 2, 4, 4)).astype(np.float32)
    source = ArraySource(data, "x", batch_size=4)
    one = quantize_sharded(if_model(), source, "U8S8", shards=1).model
    assert one.SerializeToString() == quantize_sharded(if_model(), source, "U8S8", shards=4,
                                                       executor=RayExecutor()).model.SerializeToString()
    assert any(n.op_type == "If" for n in one.graph.node)
    data[24:28] = -np.abs(data[24:28])  # batch 6 takes the else branch
    with pytest.raises(CalibrationError, match="If node 'sign_if' takes its else_branch in calibration batch 6"):
        quantize_sharded(if_model(), ArraySource(data, "x", batch_size=4), "U8S8", shards=4, executor=RayExecutor())
