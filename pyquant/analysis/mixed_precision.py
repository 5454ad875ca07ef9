"""Automatic mixed precision: the fewest layers kept at higher precision that bring a
quantized model to a target.

    quantize with the preset; measure (output SQNR / cosine to float on held-out data,
    and the user's metric)
      -> rank the layers by sensitivity (pyquant.analysis.sensitivity: output SQNR with
         only that layer quantized, lowest first)
      -> promote the most sensitive layer not yet promoted, quantize again, measure; undo
         the promotion if it made things worse (keep it otherwise: the layers of a chain
         help only together); repeat until the target holds (or max_promotions/max_trials)
      -> minimise: try to drop each kept promotion, the smallest measured gain first;
         drop it if the target still holds without it.

A promotion gives a layer 16-bit activations with its int8 weights (A16W8: the
activations it reads become QInt16 through QuantConfig.tensor_types, standard QDQ that
onnxruntime runs at opset 21; with a power-of-two preset the 16-bit scales are powers of
two too, so the model stays NPU-legal), or, when the target allows float (a CPU target),
leaves the layer's node in float (QuantConfig.nodes_to_exclude). Every measurement is of
a model quantized from scratch with the promoted configuration, the one returned.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import onnx
from onnx import ModelProto

from ..api import ModelLike, as_reader, quantize_detailed, resolve_config
from ..config import DEFAULT_CALIB_BATCH_SIZE, QuantConfig, QuantType
from ..data import Preprocess
from ..errors import ConfigError
from ..graph.bypass import Layer
from ..graph.model_io import load_model
from ..pipeline import QuantizeResult
from .outputs import DEFAULT_HELD_OUT_SAMPLES, OutputComparison, read_feeds, rereadable
from .sensitivity import analyze_sensitivity

log = logging.getLogger(__name__)

INT16 = "int16"
FLOAT = "float"


@dataclasses.dataclass(frozen=True)
class PrecisionTarget:
    """What the quantized model must reach. Every criterion given must hold (any one of
    them, with ``require_all=False``).

    Attributes:
        min_sqnr_db: output SQNR to the float model on the held-out data.
        min_cosine: output cosine to the float model.
        max_metric_drop: with ``evaluator``: evaluator(float) - evaluator(quantized) <= this.
        evaluator: a metric of a model, higher is better (e.g. top-1 on a labelled set).
        allow_float: promote layers to float (for a CPU target) instead of to 16-bit
            activations.
        require_all: all criteria (True) or any one of them (False).
    """

    min_sqnr_db: Optional[float] = None
    min_cosine: Optional[float] = None
    max_metric_drop: Optional[float] = None
    evaluator: Optional[Callable[[onnx.ModelProto], float]] = None
    allow_float: bool = False
    require_all: bool = True

    def __post_init__(self) -> None:
        if self.min_sqnr_db is None and self.min_cosine is None and self.max_metric_drop is None:
            raise ConfigError("a precision target needs min_sqnr_db, min_cosine or max_metric_drop")
        if (self.max_metric_drop is None) != (self.evaluator is None):
            raise ConfigError("max_metric_drop and evaluator go together: the drop is measured with the evaluator")
        if self.evaluator is not None and not callable(self.evaluator):
            raise ConfigError(f"evaluator must be callable (model -> float), got {self.evaluator!r}")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"min_cosine must be in [-1, 1], got {self.min_cosine}")
        if self.max_metric_drop is not None and self.max_metric_drop < 0:
            raise ConfigError(f"max_metric_drop must be >= 0, got {self.max_metric_drop}")

    @classmethod
    def parse(cls, text: str, allow_float: bool = False,
              evaluator: Optional[Callable[[onnx.ModelProto], float]] = None) -> "PrecisionTarget":
        """``sqnr:30``, ``cosine:0.99``, ``drop:0.01`` (with ``evaluator``), comma-separated
        (the CLI's form)."""
        fields = {"sqnr": "min_sqnr_db", "cosine": "min_cosine", "drop": "max_metric_drop"}
        values: Dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, number = part.partition(":")
            if key not in fields:
                raise ConfigError(f"precision target {part!r}: expected sqnr:DB, cosine:VALUE or drop:VALUE")
            try:
                values[fields[key]] = float(number)
            except ValueError:
                raise ConfigError(f"precision target {part!r}: {number!r} is not a number") from None
        if ("max_metric_drop" in values) != (evaluator is not None):
            raise ConfigError("a drop:VALUE target and an evaluator go together (CLI: --evaluator module:function)")
        return cls(**values, evaluator=evaluator, allow_float=allow_float)


def load_evaluator(spec: str) -> Callable[[onnx.ModelProto], float]:
    """The function ``module:function`` names (imported with the working directory on the
    path): it takes a quantized onnx.ModelProto and returns a metric, higher is better."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ConfigError(f"evaluator {spec!r}: expected module:function")
    sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"evaluator {spec!r}: cannot import {function_name!r} from {module_name!r} ({e})") from None
    finally:
        sys.path.pop(0)
    if not callable(function):
        raise ConfigError(f"evaluator {spec!r}: {function_name} is not callable")
    return function


@dataclasses.dataclass(frozen=True)
class Measurement:
    sqnr_db: float
    cosine: float
    metric: Optional[float] = None  # the evaluator's, when there is one

    def text(self) -> str:
        metric = "" if self.metric is None else f", metric {self.metric:.4f}"
        return f"SQNR {self.sqnr_db:.2f} dB, cosine {self.cosine:.5f}{metric}"


@dataclasses.dataclass(frozen=True)
class Promotion:
    """One layer given higher precision, and what it did (measured, model quantized again)."""

    layer: str
    op_type: str
    kind: str  # INT16 (its activations) or FLOAT (its node)
    tensors: Tuple[str, ...]  # the activations made 16-bit, or the node left in float
    before: Measurement
    after: Measurement
    kept: bool = True


@dataclasses.dataclass
class MixedPrecisionResult:
    model: ModelProto
    config: QuantConfig  # the preset plus the kept promotions (tensor_types / nodes_to_exclude)
    promotions: List[Promotion]  # kept, in the order made
    met: bool
    start: Measurement
    final: Measurement
    float_metric: Optional[float]
    tried: List[Promotion]  # every promotion tried, kept or not
    dropped: List[Promotion]  # kept first, then found unnecessary by the minimising pass
    quantizations: int
    seconds: float

    def to_text(self) -> str:
        lines = [f"start: {self.start.text()}"]
        for p in self.tried:
            state = "kept" if p.kept else "worse, undone"
            lines.append(f"  {p.kind:5} {p.layer} ({p.op_type}): {p.before.text()} -> {p.after.text()} [{state}]")
        for p in self.dropped:
            lines.append(f"  dropped {p.layer}: not needed to meet the target")
        lines.append(f"final: {self.final.text()}; {len(self.promotions)} layer(s) promoted; target "
                     f"{'met' if self.met else 'NOT met'}; {self.quantizations} quantizations in {self.seconds:.1f} s")
        return "\n".join(lines)


class _Calibration:
    """Calibration data that can be read once per quantization."""

    def __init__(self, data: Any, model: ModelProto, batch_size: int, preprocess: Optional[Preprocess],
                 limit: Optional[int]) -> None:
        if not rereadable(data):  # a generator or a reader without rewind(): kept in memory
            data = read_feeds(data, model, limit, batch_size, preprocess)
        self.data, self.model, self.batch_size, self.preprocess, self.limit = data, model, batch_size, preprocess, limit

    def reader(self):
        if hasattr(self.data, "get_next"):
            self.data.rewind()
            return self.data
        return as_reader(self.data, self.model, self.batch_size, self.preprocess, self.limit)


def auto_mixed_precision(model: ModelLike, calib_data: Any, config: Any = "XINT8",
                         target: PrecisionTarget = PrecisionTarget(min_sqnr_db=30.0), held_out: Any = None,
                         max_promotions: Optional[int] = None, *,
                         held_out_samples: int = DEFAULT_HELD_OUT_SAMPLES, num_calib: Optional[int] = None,
                         batch_size: Optional[int] = None, threads: Optional[int] = None,
                         preprocess: Optional[Preprocess] = None, minimise: bool = True,
                         max_trials: Optional[int] = None) -> MixedPrecisionResult:
    """Quantize ``model`` under ``config`` and promote its most sensitive layers, one at a
    time, until ``target`` holds on ``held_out`` (at most ``held_out_samples`` samples;
    None: the calibration data, with a warning), ``max_promotions`` are kept or
    ``max_trials`` promotions were tried (each tried promotion is one quantization; the
    minimising pass costs one more per kept promotion). ``minimise=False`` skips that pass."""
    start_time = time.perf_counter()
    for name, value in (("max_promotions", max_promotions), ("max_trials", max_trials)):
        if value is not None and value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    proto = model if isinstance(model, ModelProto) else load_model(model)
    base = resolve_config(config)
    if target.allow_float and (base.enable_npu_cnn or base.power_of_two):
        log.warning("mixed precision: float promotions under an NPU preset: the layers promoted run on the CPU, "
                    "not the NPU (without allow_float promotions are 16-bit activations with power-of-two scales)")
    calibration = _Calibration(calib_data, proto, batch_size or base.calib_batch_size or DEFAULT_CALIB_BATCH_SIZE,
                               preprocess, num_calib)
    if held_out is None:
        log.warning("no held-out data: measuring the target on the calibration data")
        held_out = calibration.data
    feeds = read_feeds(held_out, proto, held_out_samples, batch_size, preprocess)
    outputs = OutputComparison(proto, feeds)
    float_metric = float(target.evaluator(proto)) if target.evaluator is not None else None
    count = {"quantizations": 0}

    def trial(trial_config: QuantConfig, keep_float_model: bool = False) -> Tuple[QuantizeResult, Measurement]:
        count["quantizations"] += 1
        result = quantize_detailed(proto, calibration.reader(), trial_config, threads=threads,
                                   keep_float_model=keep_float_model)
        error = outputs.error(result.model)
        metric = float(target.evaluator(result.model)) if target.evaluator is not None else None
        return result, Measurement(error.sqnr_db, error.cosine, metric)

    def met(m: Measurement) -> bool:
        checks = []
        if target.min_sqnr_db is not None:
            checks.append(m.sqnr_db >= target.min_sqnr_db)
        if target.min_cosine is not None:
            checks.append(m.cosine >= target.min_cosine)
        if target.max_metric_drop is not None:
            checks.append(float_metric - m.metric <= target.max_metric_drop + 1e-12)
        return all(checks) if target.require_all else any(checks)

    current_config = base
    current, start = trial(base, keep_float_model=True)
    measured = start
    tried: List[Promotion] = []
    kept: List[Promotion] = []
    if not met(measured) and max_promotions != 0:
        sensitivity = analyze_sensitivity(proto, None, base, feeds, held_out_samples=held_out_samples,
                                          threads=threads, quantized=current, only_float=False)
        for layer_sensitivity in sensitivity.ranked():
            if max_trials is not None and len(tried) >= max_trials:
                log.warning("mixed precision: stopped after %d promotions tried (max_trials)", len(tried))
                break
            layer = layer_sensitivity.layer
            promoted = _promote(current_config, layer, current, target.allow_float)
            if promoted is None:
                continue
            new_config, kind, tensors = promoted
            result, after = trial(new_config)
            keep = not _worse(after, measured, target)
            promotion = Promotion(layer.name, layer.op_type, kind, tensors, measured, after, keep)
            tried.append(promotion)
            log.info("promoted %s (%s) to %s: %s -> %s%s", layer.name, layer.op_type, kind, measured.text(),
                     after.text(), "" if keep else " (worse: undone)")
            if keep:
                kept.append(promotion)
                current_config, current, measured = new_config, result, after
                if met(measured) or (max_promotions is not None and len(kept) >= max_promotions):
                    break
    dropped: List[Promotion] = []
    if minimise and met(measured) and len(kept) > 1:
        gains = {id(p): _gain(p) for p in kept}
        for promotion in sorted(kept, key=lambda p: gains[id(p)]):
            remaining = [p for p in kept if p is not promotion and p not in dropped]
            without = _with_promotions(base, remaining)
            result, after = trial(without)
            if met(after):
                dropped.append(promotion)
                current_config, current, measured = without, result, after
        kept = [p for p in kept if p not in dropped]
    return MixedPrecisionResult(current.model, current_config, kept, met(measured), start, measured, float_metric,
                                tried, dropped, count["quantizations"], time.perf_counter() - start_time)


def _promote(config: QuantConfig, layer: Layer, quantized: QuantizeResult, allow_float: bool):
    """(config with ``layer`` promoted, kind, tensors), or None when it cannot be promoted
    further (its activations already 16-bit, or nothing of it is quantized any more)."""
    if allow_float and not layer.output:
        if layer.name in config.nodes_to_exclude:
            return None
        return dataclasses.replace(config, nodes_to_exclude=config.nodes_to_exclude | {layer.name}), FLOAT, \
            (layer.name,)
    quantized_activations = set(quantized.plan.activations)
    tensors = tuple(t for t in layer.activations if t in quantized_activations
                    and config.tensor_types.get(t, config.activation_type).bits < 16)
    if not tensors:
        return None
    types = dict(config.tensor_types)
    types.update({t: QuantType.QInt16 for t in tensors})
    return dataclasses.replace(config, tensor_types=types), INT16, tensors


def _with_promotions(base: QuantConfig, promotions: List[Promotion]) -> QuantConfig:
    types = dict(base.tensor_types)
    excluded = set(base.nodes_to_exclude)
    for p in promotions:
        if p.kind == INT16:
            types.update({t: QuantType.QInt16 for t in p.tensors})
        else:
            excluded.update(p.tensors)
    return dataclasses.replace(base, tensor_types=types, nodes_to_exclude=frozenset(excluded))


# A promotion that lowers the output SQNR by more than this (noise of re-calibration aside)
# is undone; one that changes nothing is kept: the layers of a chain (a written-out
# LayerNorm's E[x^2] - E[x]^2) help only together. The minimising pass removes the kept
# promotions the target does not need.
WORSE_TOLERANCE_DB = 0.1


def _worse(after: Measurement, before: Measurement, target: PrecisionTarget) -> bool:
    """Whether ``after`` is further from the target than ``before``: by the evaluator's
    metric when the target is the metric alone (a tie goes to the output SQNR), by the
    cosine when only a cosine is asked for, else by the output SQNR."""
    if target.max_metric_drop is not None and target.min_sqnr_db is None and target.min_cosine is None:
        if after.metric != before.metric:
            return after.metric < before.metric
    elif target.min_sqnr_db is None and target.min_cosine is not None:
        return after.cosine < before.cosine
    return after.sqnr_db < before.sqnr_db - WORSE_TOLERANCE_DB


def _gain(p: Promotion) -> float:
    return p.after.sqnr_db - p.before.sqnr_db
