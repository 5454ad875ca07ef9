"""The quantization pipeline: load, prepare, plan, calibrate, rewrite, save."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import ModelProto

from .calibrate.collector import TensorCollector
from .calibrate.methods import QParams, activation_qparams
from .calibrate.runner import ProgressCallback, batch_samples, collect
from .config import QuantConfig
from .errors import ModelError
from .graph.fold_bn import fold_batch_norm
from .graph.plan import QuantPlan, plan_for
from .graph.qdq import write_qdq
from .techniques import bias_absorption, bias_correction, cle
from .techniques.fast_finetune.finetune import FinetuneReport, LayerCallback, finetune, require_rewind

log = logging.getLogger(__name__)
# QuantizeLinear with per-axis scales needs opset 13.
MIN_OPSET = 13


@dataclasses.dataclass(frozen=True)
class QuantizeResult:
    model: ModelProto
    plan: QuantPlan
    qparams: Dict[str, QParams]
    seconds_calibration: float
    seconds_total: float
    finetune: Optional[FinetuneReport] = None


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


def group_qparams(plan: QuantPlan, collectors: Dict[str, TensorCollector],
                  config: QuantConfig) -> Dict[str, QParams]:
    """One QParams per scale-sharing group, computed from the group's merged statistics."""
    result: Dict[str, QParams] = {}
    for members in plan.groups:
        merged = collectors[members[0]]
        for name in members[1:]:
            merged = merged.merged(collectors[name])
        qp = activation_qparams(merged, config)
        for name in members:
            result[name] = qp
    return result


class _PeekedReader:
    """A reader whose first batches (at least ``samples`` samples, or all there are) were
    read ahead, to look at real data before calibration; they are replayed first."""

    def __init__(self, reader, samples: int = 1) -> None:
        self.reader = reader
        self.peeked: List[Dict[str, np.ndarray]] = []
        count = 0
        while count < samples and (batch := reader.get_next()) is not None:
            self.peeked.append(batch)
            count += batch_samples(batch)
        self._pending = list(self.peeked)

    def __len__(self) -> int:
        return len(self.reader)

    def rewind(self) -> None:
        require_rewind(self.reader)
        self._pending = []
        self.reader.rewind()

    def get_next(self):
        if self._pending:
            return self._pending.pop(0)
        return self.reader.get_next()


def quantize_model(model: ModelProto, reader, config: QuantConfig,
                   progress: Optional[ProgressCallback] = None,
                   on_layer: Optional[LayerCallback] = None,
                   finetune_progress: Optional[ProgressCallback] = None) -> QuantizeResult:
    """Quantize an in-memory float model with calibration data from ``reader``.
    ``progress`` follows the calibration batches; with fast finetune ``finetune_progress``
    follows the batches of its passes and ``on_layer`` receives each layer's result."""
    start = time.perf_counter()
    prepared = prepare(model)
    if config.cross_layer_equalization:
        reader = _PeekedReader(reader, config.cle.activation_samples)
        original = ModelProto()  # the function CLE must preserve
        original.CopyFrom(prepared)
        if config.cle.replace_clip_with_relu:
            cle.replace_clips_with_relu(original)
        report = cle.equalize(prepared, config.cle, reader.peeked)
        if reader.peeked:  # on a real batch, before any statistics are taken
            cle.check_equivalence(original, prepared, reader.peeked[:1], config.cle.check_rtol, report.pair_list)
        if config.cle.high_bias_absorption:  # approximate by design: after the exactness check
            bias_absorption.absorb_high_biases(prepared, report.pair_list, reader.peeked,
                                               config.cle.absorption_sigmas)
        reader.peeked.clear()  # the batches stay queued for calibration only
        del original
    plan = plan_for(prepared, config)
    t0 = time.perf_counter()
    means_needed = bias_correction.needed_means(plan) if config.bias_correction else {}
    stats = collect(prepared, plan, reader, config, progress, means_needed)
    seconds_calibration = time.perf_counter() - t0
    qparams = group_qparams(plan, stats.ranges, config)
    float_model = None
    if config.fast_finetune is not None:  # the function to reproduce, before bias correction
        float_model = ModelProto()
        float_model.CopyFrom(prepared)
    if config.bias_correction:
        means = {name: c.mean for name, c in stats.channel_means.items()}
        bias_correction.apply_bias_correction(prepared, plan, means, config)
        plan = plan_for(prepared, config)  # layers may have gained a bias input
    fixed, report = {}, None
    if float_model is not None:
        fixed, report = finetune(float_model, prepared, plan, qparams, config, reader, config.fast_finetune,
                                 finetune_progress, on_layer)
        del float_model
        plan = plan_for(prepared, config)
    quantized = write_qdq(prepared, plan, qparams, config, fixed)
    try:
        onnx.checker.check_model(quantized)
    except onnx.checker.ValidationError as e:  # a bug of ours, not of the user's model
        raise ModelError(f"internal error: the quantized model is invalid: {str(e).splitlines()[0]}") from None
    log.info("quantized %d activations, %d weights, %d biases; %d nodes left in float",
             len(plan.activations), len(plan.weights), len(plan.biases), len(plan.skipped))
    return QuantizeResult(quantized, plan, qparams, seconds_calibration, time.perf_counter() - start, report)
