"""The quantization pipeline: prepare, run the techniques around one calibration pass,
write the QDQ model.

    prepare (opset check, BatchNormalization folding, shape inference)
      -> GRAPH techniques (CLE, ...) on the float model, with a few peeked samples
      -> plan (which tensors get QDQ pairs, which share a scale)
      -> calibration: one pass collecting every planned activation's statistics and
         what each PARAMETERS technique asked for
      -> the parameter table (activations and weights, computed once)
      -> PARAMETERS techniques (bias correction, fast finetune, ...)
      -> QDQ model from the table

The techniques and their order are pyquant.techniques.REGISTRY; the pipeline knows none
of them by name.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import operator
import time
from typing import Any, Dict, List

import onnx
from onnx import ModelProto

from . import threads
from .calibrate.runner import StatisticsRequest, collect
from .calibrate.table import build_table
from .config import QuantConfig
from .errors import ModelError
from .graph.fold_bn import fold_batch_norm
from .graph.plan import QuantPlan
from .graph.qdq import write_qdq
from .qparams import QuantTable
from .runtime import PeekedReader, RebatchedReader, require_rewind
from .techniques import Callbacks, QuantState, Stage, Technique, techniques_for

log = logging.getLogger(__name__)
# QuantizeLinear with per-axis scales needs opset 13.
MIN_OPSET = 13


@dataclasses.dataclass(frozen=True)
class QuantizeResult:
    model: ModelProto
    plan: QuantPlan
    table: QuantTable
    reports: Dict[str, Any]  # technique name -> its report (e.g. "fast_finetune": FinetuneReport)
    seconds_calibration: float
    seconds_total: float


def prepare(model: ModelProto) -> ModelProto:
    """Shape inference (for element types) and BatchNormalization folding, on a copy."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ModelError(f"model opset {opset} is older than {MIN_OPSET}; convert it first "
                         f"(onnx.version_converter.convert_version(model, {MIN_OPSET}))")
    prepared = ModelProto()
    prepared.CopyFrom(model)
    fold_batch_norm(prepared)
    try:
        prepared = onnx.shape_inference.infer_shapes(prepared)
    except Exception as e:
        raise ModelError(f"shape inference failed: {e}") from None
    return prepared


def _calibration_reader(reader, config: QuantConfig):
    """``reader`` in batches of config.calib_batch_size (when set and not already so)."""
    size = config.calib_batch_size
    if size is None or getattr(reader, "batch_size", None) == size:
        return reader
    return RebatchedReader(reader, size)


def _run_graph_stage(state: QuantState, techniques: List[Technique]) -> None:
    samples = max((t.samples_needed() for t in techniques), default=0)
    peeked = None
    if samples:
        peeked = state.reader = PeekedReader(state.reader, samples)
        state.samples = peeked.peeked
    for technique in techniques:
        technique.apply(state)
    state.samples = []
    if peeked is not None:
        peeked.peeked.clear()  # the batches stay queued for calibration only


def quantize_model(model: ModelProto, reader, config: QuantConfig, callbacks: Callbacks = Callbacks()
                   ) -> QuantizeResult:
    """Quantize an in-memory float model with calibration data from ``reader`` (an object
    with get_next(); rewind() too when a technique reads the data twice)."""
    start = time.perf_counter()
    techniques = techniques_for(config)
    graph_stage = [t for t in techniques if t.stage is Stage.GRAPH]
    parameter_stage = [t for t in techniques if t.stage is Stage.PARAMETERS]
    rereaders = [t.name for t in techniques if t.rereads_data]
    if rereaders:  # before any work, on the reader as given
        require_rewind(reader, " and ".join(rereaders))
    with threads.budget(config.threads):
        state = QuantState(prepare(model), config, _calibration_reader(reader, config), callbacks)
        _run_graph_stage(state, graph_stage)
        state.replan()
        request = functools.reduce(operator.or_, (t.statistics_needed(state) for t in parameter_stage),
                                   StatisticsRequest())
        if any(t.needs_float_model for t in parameter_stage):
            state.float_model = ModelProto()
            state.float_model.CopyFrom(state.model)
        t0 = time.perf_counter()
        state.statistics = collect(state.model, state.plan, state.reader, config, request, callbacks.calibration)
        seconds_calibration = time.perf_counter() - t0
        state.table = build_table(state.model, state.plan, state.statistics.ranges, config)
        for technique in parameter_stage:
            technique.apply(state)
        state.float_model = None
        quantized = write_qdq(state.model, state.plan, state.table, config)
    try:
        onnx.checker.check_model(quantized)
    except onnx.checker.ValidationError as e:  # a bug of ours, not of the user's model
        raise ModelError(f"internal error: the quantized model is invalid: {str(e).splitlines()[0]}") from None
    plan = state.plan
    log.info("quantized %d activations, %d weights, %d biases; %d nodes left in float",
             len(plan.activations), len(plan.weights), len(plan.biases), len(plan.skipped))
    return QuantizeResult(quantized, plan, state.table, state.reports, seconds_calibration,
                          time.perf_counter() - start)
