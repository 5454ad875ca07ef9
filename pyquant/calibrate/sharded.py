"""The calibration pass over shards of the data, collected by workers and merged.

The single-process pass (runner.collect) grows each histogram's grid as new values
arrive, so its bins depend on the order of the batches, and re-binning a histogram onto
another grid splits bins by proportion: histograms collected on different workers cannot
be merged into the bits one pass would give. The sharded pass therefore fixes each grid
first:

  1. ranges: every worker returns the min/max of each activation over its shard; the
     merged range (exact: min of mins) sets the grid, [min, max] in num_bins bins
     (collector.initial_grid);
  2. histograms: every worker counts its values on that grid. Counts are whole numbers,
     so the sum of the workers' histograms is exact and independent of the sharding.

Channel means (bias correction) are sums in float64 whose rounding depends on the order
of the additions: each worker returns every batch's channel totals and the driver adds
them in batch order, which is what the single pass does (sum += batch total).

So the statistics, and the quantized model, are bit-identical whatever the number of
shards and wherever they run (tests/test_sharded.py: one shard in this process against
several on Ray). Step 1 costs one more inference pass over the data; a config without
histograms (MinMax) skips it. The grid differs from the streaming pass's (which has
grown by whole factors to cover the range), so the scales of a sharded run may differ
from ``pyquant.quantize``'s in the last bins' resolution, not between shard counts.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import ModelProto

from .. import kernels, threads
from ..config import QuantConfig
from ..datasource import DataSource, shard_ranges
from ..distributed import LocalExecutor, resolve_shared
from ..errors import CalibrationError, DataError
from ..graph.plan import QuantPlan
from ..graph.view import GraphView
from ..runtime import check_feed, make_session
from .collector import ChannelMeanCollector, TensorCollector, initial_grid
from .runner import BranchCheck, ProgressCallback, Statistics, StatisticsRequest

Grid = Tuple[float, float]


@dataclasses.dataclass
class ShardStatistics:
    """What one worker returns for its shard: per tensor (min, max, finite count), the
    histograms on the given grids, and each batch's channel totals, in batch order."""

    ranges: Dict[str, Tuple[float, float, int]]
    histograms: Dict[str, np.ndarray]
    channel_totals: Dict[str, List[np.ndarray]]
    batches: int


def collect_shard(model_bytes, names: Sequence[str], fed: Sequence[str], grids: Optional[Mapping[str, Grid]],
                  num_bins: int, channel_axes: Mapping[str, int], source: DataSource, start: int, stop: int,
                  first_batch: int, thread_count: Optional[int], conditions: Sequence = ()) -> ShardStatistics:
    """Statistics of the tensors ``fed`` (graph inputs, from the feed) and ``names`` (from
    the model) over samples [start, stop) of ``source``; histograms only with ``grids``;
    every batch must take the branch of each inlined If of ``conditions`` (runner.BranchCheck).
    Runs in a worker: every argument is a plain value."""
    model = onnx.load_from_string(resolve_shared(model_bytes))
    view = GraphView(model)
    tensors = list(fed) + list(names)
    ranges = {name: [np.inf, -np.inf, 0] for name in tensors}
    histograms = {name: np.zeros(num_bins) for name in (grids or {})}
    totals: Dict[str, List[np.ndarray]] = {name: [] for name in channel_axes}
    batches = 0
    with threads.budget(thread_count):
        session = make_session(model, list(names)) if names else None
        reader = source.reader(start, stop)
        check_branches = BranchCheck(model, conditions) if conditions else None
        while True:
            feed = reader.get_next()
            if feed is None:
                break
            index = first_batch + batches
            if session is not None:
                feed = check_feed(session, feed, index)
            if check_branches is not None:
                check_branches(feed, index)
            values = [feed[n] for n in fed] + (session.run(list(names), feed) if names else [])
            for name, value in zip(tensors, values):
                value = np.ascontiguousarray(value, dtype=np.float32)
                if name in histograms:
                    lo, hi = grids[name]
                    added, stats = kernels.histogram_accumulate_if_in_range(value, histograms[name], lo, hi)
                    if not added and not (stats.nan or stats.pos_inf or stats.neg_inf):
                        raise CalibrationError(f"tensor {name!r} left its range of the first pass in batch {index} "
                                               "(the data changed between the two passes)")
                else:
                    stats = kernels.range_stats(value)
                if stats.nan or stats.pos_inf or stats.neg_inf:
                    producer = view.producer.get(name)
                    where = f" (output of node {view.node_name(producer)})" if producer is not None else \
                        " (a model input)"
                    raise CalibrationError(f"tensor {name!r}{where} has {stats.nan} NaN, {stats.pos_inf} +Inf and "
                                           f"{stats.neg_inf} -Inf values in calibration batch {index}")
                entry = ranges[name]
                if stats.finite:
                    entry[0], entry[1] = min(entry[0], float(stats.min)), max(entry[1], float(stats.max))
                    entry[2] += int(stats.finite)
                if name in totals:
                    batch_total = np.zeros(value.shape[channel_axes[name]])
                    kernels.channel_sums(value, batch_total, channel_axes[name])
                    totals[name].append(batch_total)
            batches += 1
    return ShardStatistics({k: tuple(v) for k, v in ranges.items()}, histograms, totals, batches)


class ShardedCalibration:
    """A ``collect_statistics`` for pyquant.pipeline.quantize_model that reads ``source``
    in ``shards`` shards on ``executor`` (in-process when None) instead of the reader the
    pipeline holds (which still serves the look before calibration and a technique's
    second pass, such as fast finetune's)."""

    def __init__(self, source: DataSource, shards: int, executor=None, threads_per_shard: Optional[int] = None):
        self.source, self.executor = source, executor or LocalExecutor()
        self.ranges = shard_ranges(len(source), source.batch_size, shards)
        self.threads_per_shard = threads_per_shard or self.executor.cpus_per_task

    def __call__(self, model: ModelProto, plan: QuantPlan, reader, config: QuantConfig,
                 request: StatisticsRequest = StatisticsRequest(),
                 progress: Optional[ProgressCallback] = None, conditions: Sequence = (),
                 loops: Sequence = ()) -> Statistics:
        """``loops`` (Loop/Scan bodies, pyquant.calibrate.loops) are not stepped on the
        shards: they stay float, reported."""
        view = GraphView(model)
        missing = set(request.channel_means) - set(plan.activations)
        if missing:
            raise ValueError(f"channel means asked for tensors that are not calibrated: {sorted(missing)}")
        constants, inputs = set(plan.constant_activations), set(view.graph_inputs)
        fed = [n for n in plan.activations if n in inputs]
        names = [n for n in plan.activations if n not in constants and n not in inputs]
        model_bytes = self.executor.shared(model.SerializeToString())
        passes = 2 if config.needs_histogram else 1
        done = [0]

        def run(grids, channel_axes) -> List[ShardStatistics]:
            batch = self.source.batch_size
            calls = [(model_bytes, names, fed, grids, config.num_bins, channel_axes, self.source, start, stop,
                      start // batch, self.threads_per_shard, list(conditions)) for start, stop in self.ranges]
            results: List[Optional[ShardStatistics]] = [None] * len(calls)
            for index, result in self.executor.map_unordered(collect_shard, calls):
                results[index] = result
                done[0] += 1
                if progress is not None:
                    progress(done[0], passes * len(calls))
            return results

        grids = None
        if config.needs_histogram:
            first = run(None, {})
            grids = {name: initial_grid(lo, hi) for name, (lo, hi, count) in _merged_ranges(first).items() if count}
        parts = run(grids, dict(request.channel_means))
        if sum(p.batches for p in parts) == 0:
            raise DataError("the calibration data produced no batch")
        collectors = self._collectors(parts, grids, config)
        for name in plan.constant_activations:
            collectors[name] = TensorCollector(config.num_bins, config.needs_histogram)
            collectors[name].update(view.constant_value(name))
        means = {}
        for name, axis in request.channel_means.items():
            mean = ChannelMeanCollector(axis)
            for part in parts:  # shards in data order, batches in order within each
                for batch_total in part.channel_totals[name]:
                    if mean.sums is None:
                        mean.sums = np.zeros_like(batch_total)
                    mean.sums += batch_total
            mean.count = collectors[name].count // len(mean.sums) if mean.sums is not None and len(mean.sums) else 0
            means[name] = mean
        left = {c.body.name: f"{c.body.op_type} body stays float: sharded calibration does not step Loop/Scan bodies"
                for c in loops}
        return Statistics({n: collectors[n] for n in plan.activations}, means, sum(p.batches for p in parts),
                          bodies_left=left)

    @staticmethod
    def _collectors(parts: Sequence[ShardStatistics], grids: Optional[Mapping[str, Grid]],
                    config: QuantConfig) -> Dict[str, TensorCollector]:
        collectors = {}
        for name, (lo, hi, count) in _merged_ranges(parts).items():
            c = TensorCollector(config.num_bins, histogram=config.needs_histogram)
            c.count = count
            if count:
                c.min, c.max = lo, hi
            if c.hist is not None and grids and name in grids:
                c.lo, c.hi = grids[name]
                for part in parts:
                    c.hist += part.histograms[name]
            collectors[name] = c
        return collectors


def _merged_ranges(parts: Sequence[ShardStatistics]) -> Dict[str, Tuple[float, float, int]]:
    merged: Dict[str, Tuple[float, float, int]] = {}
    for part in parts:
        for name, (lo, hi, count) in part.ranges.items():
            m_lo, m_hi, m_count = merged.get(name, (np.inf, -np.inf, 0))
            merged[name] = (min(m_lo, lo), max(m_hi, hi), m_count + count)
    return merged
