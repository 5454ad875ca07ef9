"""One trial: quantize with the trial's configuration, then score the result. Runs in a
Ray task or in this process; every argument is a plain value and the outcome is a plain
dict (the journal's record) plus the quantized model's bytes."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Optional, Tuple

import onnx
from onnx import ModelProto

from .. import threads
from ..analysis.mixed_precision import PrecisionTarget, auto_mixed_precision
from ..api import quantize_detailed
from ..config import QuantConfig
from ..datasource import DataSource
from ..distributed import resolve_shared
from ..errors import PyquantError
from ..evaluation import model_size_mb
from .space import Trial


def quantize_trial(model: ModelProto, calib: DataSource, config: QuantConfig, thread_count: Optional[int],
                   mixed_precision: Optional[Dict[str, Any]],
                   evaluator: Optional[Callable[[ModelProto], float]] = None) -> ModelProto:
    """The trial's quantized model; with a mixed precision target, the one automatic mixed
    precision makes (pyquant.analysis.mixed_precision: its most sensitive layers promoted
    until the target holds on the calibration data; ``evaluator``, higher is better, measures
    a max_metric_drop)."""
    if not mixed_precision:
        return quantize_detailed(model, calib.reader(), config, threads=thread_count).model
    target = PrecisionTarget(**mixed_precision, evaluator=evaluator if "max_metric_drop" in mixed_precision else None)
    return auto_mixed_precision(model, calib.reader(), config, target, threads=thread_count).model


def run_trial(model_bytes, calib: DataSource, trial: Trial, objective, prepared,
              thread_count: Optional[int]) -> Tuple[Dict[str, Any], Optional[bytes]]:
    """(record, quantized model bytes or None). A PyquantError of this configuration on
    this model (e.g. a technique that cannot apply) is the trial's result, not the search's
    end: the record carries its message."""
    model = onnx.load_from_string(resolve_shared(model_bytes))
    prepared = resolve_shared(prepared)
    record: Dict[str, Any] = {"trial_id": trial.trial_id, "index": trial.index, "params": dict(trial.params),
                              "npu_legal": trial.npu_legal, "threads": thread_count}
    start = time.perf_counter()
    try:
        config = dataclasses.replace(trial.config, threads=thread_count)
        def evaluator(candidate: ModelProto) -> float:  # higher is better, as PrecisionTarget reads it
            value = objective.score(candidate, prepared)
            return value if objective.higher_is_better else -value
        quantized = quantize_trial(model, calib, config, thread_count, trial.mixed_precision, evaluator)
        record["quantize_seconds"] = time.perf_counter() - start
        t0 = time.perf_counter()
        with threads.budget(thread_count):
            record["score"] = objective.score(quantized, prepared)
        record["eval_seconds"] = time.perf_counter() - t0
        record["size_mb"] = model_size_mb(quantized)
        return record, quantized.SerializeToString()
    except PyquantError as e:
        record["error"] = f"{type(e).__name__}: {e}"
        record["quantize_seconds"] = time.perf_counter() - start
        return record, None
