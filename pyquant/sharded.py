"""Calibration and evaluation over a large data set, cut into shards that workers
(Ray tasks, or this process) read by themselves.

    quantize_sharded(model, source, config, shards=8, executor=RayExecutor("auto"))
    evaluate_sharded(model, source, shards=8, executor=...)

Both give the result of one pass over the whole source, bit for bit, whatever the number
of shards: calibration through pyquant.calibrate.sharded (fixed histogram grids, counts
added exactly, channel sums added in batch order); evaluation by adding the shards'
counts of correct predictions (integers) and concatenating their predictions in order.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple, Union

import numpy as np
import onnx
from onnx import ModelProto

from . import threads
from .api import resolve_config
from .calibrate.sharded import ShardedCalibration
from .datasource import DataSource, shard_ranges
from .distributed import LocalExecutor, resolve_shared
from .errors import DataError
from .evaluation import model_size_mb, top5_hits
from .graph.model_io import check_output_path, load_model, save_model
from .pipeline import QuantizeResult, quantize_model
from .runtime import make_provider_session
from .techniques import Callbacks

ModelLike = Union[str, ModelProto]


def quantize_sharded(model: ModelLike, source: DataSource, config="XINT8", shards: int = 2, executor=None,
                     output=None, threads_per_shard: Optional[int] = None) -> QuantizeResult:
    """Quantize with the calibration pass collected over ``shards`` shards of ``source``
    on ``executor`` (pyquant.distributed; None: in this process). The driver reads the
    source itself only where the pipeline looks at data before calibration (graph
    preparation's check, CLE's samples) and for a technique's second pass (fast finetune)."""
    quant_config = dataclasses.replace(resolve_config(config), calib_batch_size=None)
    if output is not None:
        check_output_path(output, model if not isinstance(model, ModelProto) else None)
    proto = model if isinstance(model, ModelProto) else load_model(model)
    calibration = ShardedCalibration(source, shards, executor, threads_per_shard)
    result = quantize_model(proto, source.reader(), quant_config, Callbacks(), calibration)
    if output is not None:
        save_model(result.model, output)
    return result


@dataclasses.dataclass(frozen=True)
class ShardedEvalResult:
    top1: float
    top5: float
    n: int
    size_mb: float
    shards: int
    predictions: np.ndarray  # argmax per sample, in source order


def evaluate_shard(model_bytes, source: DataSource, start: int, stop: int,
                   thread_count: Optional[int]) -> Tuple[int, int, int, np.ndarray]:
    """(top-1 correct, top-5 correct, samples, predictions) of a classifier over samples
    [start, stop) of a labelled ``source``. Runs in a worker."""
    model = onnx.load_from_string(resolve_shared(model_bytes))
    with threads.budget(thread_count):
        session = make_provider_session(model)
        input_name = session.get_inputs()[0].name
        reader = source.reader(start, stop)
        correct1 = correct5 = n = 0
        predictions: List[np.ndarray] = []
        while True:
            item = reader.next_labeled()
            if item is None:
                break
            images, labels = item
            top1, hits1, hits5 = top5_hits(session.run(None, {input_name: images})[0], labels)
            correct1 += hits1
            correct5 += hits5
            n += len(labels)
            predictions.append(top1)
    return correct1, correct5, n, np.concatenate(predictions) if predictions else np.zeros(0, np.int64)


def evaluate_sharded(model: ModelLike, source: DataSource, shards: int = 2, executor=None,
                     threads_per_shard: Optional[int] = None) -> ShardedEvalResult:
    """Top-1/top-5 of a classifier over a labelled ``source``, in ``shards`` shards on
    ``executor`` (None: in this process): the sums of the shards' counts."""
    executor = executor or LocalExecutor()
    proto = model if isinstance(model, ModelProto) else load_model(model)
    model_bytes = executor.shared(proto.SerializeToString())
    ranges = shard_ranges(len(source), source.batch_size, shards)
    calls = [(model_bytes, source, start, stop, threads_per_shard or executor.cpus_per_task)
             for start, stop in ranges]
    parts: List[Optional[tuple]] = [None] * len(calls)
    for index, part in executor.map_unordered(evaluate_shard, calls):
        parts[index] = part
    n = sum(p[2] for p in parts)
    if n == 0:
        raise DataError("no samples to evaluate")
    return ShardedEvalResult(sum(p[0] for p in parts) / n, sum(p[1] for p in parts) / n, n,
                             model_size_mb(proto), len(parts), np.concatenate([p[3] for p in parts]))
