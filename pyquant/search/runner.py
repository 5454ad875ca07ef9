"""Accuracy-driven search: run a space's trials (in parallel on Ray, or one after another
in this process), journal each, and keep the best model that meets the constraints.

    result = run_search("model.onnx", calib_source, SearchSpace.from_json_file("space.json"),
                        Top1Objective(val_source), "experiments/lite0", output="best.onnx",
                        constraints=Constraints(npu_legal=True), executor=RayExecutor())

A trial is a pure function of (model, calibration data, configuration, objective): its
score is the same wherever it runs, given the same threads per trial (quantized models are
byte-identical whatever the threads; onnxruntime's float sums in evaluation may depend on
them). The best trial is the feasible one with the best score, the earliest on a tie.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Union

import onnx
from onnx import ModelProto

from ..datasource import DataSource, describe_source
from ..distributed import LocalExecutor
from ..errors import ConfigError
from ..graph.model_io import check_output_path, load_model, save_model
from .journal import Experiment
from .objective import better
from .results import SearchResult
from .space import SearchSpace
from .trial import run_trial

log = logging.getLogger(__name__)

TrialProgress = Callable[[int, int, Dict[str, Any]], None]  # (done, total, record)


@dataclasses.dataclass(frozen=True)
class Constraints:
    """What a trial must meet to count: NPU-legal (checked before running: other points
    are not tried), at most ``max_size_mb`` megabytes, at most ``max_quantize_seconds``
    of quantization (as measured in the trial, with its thread share)."""

    npu_legal: bool = False
    max_size_mb: Optional[float] = None
    max_quantize_seconds: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("max_size_mb", "max_quantize_seconds"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive, got {value!r}")

    def violations(self, record: Dict[str, Any]) -> List[str]:
        found = []
        if self.npu_legal and not record["npu_legal"]:
            found.append("not NPU-legal")
        if self.max_size_mb is not None and record.get("size_mb", 0) > self.max_size_mb:
            found.append(f"size {record['size_mb']:.2f} MB > {self.max_size_mb:g} MB")
        if self.max_quantize_seconds is not None and record.get("quantize_seconds", 0) > self.max_quantize_seconds:
            found.append(f"quantization {record['quantize_seconds']:.1f} s > {self.max_quantize_seconds:g} s")
        return found


def run_search(model: Union[str, ModelProto], calib: DataSource, space: SearchSpace, objective,
               experiment: Union[str, Experiment], output=None, constraints: Constraints = Constraints(),
               executor=None, threads_per_trial: Optional[int] = None,
               progress: Optional[TrialProgress] = None) -> SearchResult:
    """Run the trials of ``space`` not yet in ``experiment``'s journal on ``executor``
    (None: in this process), then write results.csv and results.html there and, with
    ``output``, the best feasible model (atomically). ``threads_per_trial``: each trial's
    thread budget (default: the executor's CPUs per task on Ray, every CPU in-process)."""
    start = time.perf_counter()
    executor = executor or LocalExecutor()
    if output is not None:
        check_output_path(output, model if isinstance(model, str) else None)
    proto = model if isinstance(model, ModelProto) else load_model(model)
    model_bytes = proto.SerializeToString()
    experiment = experiment if isinstance(experiment, Experiment) else Experiment(experiment)
    trials, dropped = space.trials(npu_legal_only=constraints.npu_legal)
    if not trials:
        raise ConfigError(f"the search space has no trial to run ({_dropped_text(dropped)})")
    experiment.start({"model_sha256": hashlib.sha256(model_bytes).hexdigest(), "calibration": describe_source(calib),
                      "space": space.as_dict(), "objective": objective.fingerprint(),
                      "constraints": dataclasses.asdict(constraints)})
    finished = experiment.finished()
    pending = [t for t in trials if t.trial_id not in finished]
    if finished:
        log.info("resuming %s: %d of %d trials already done", experiment.folder, len(trials) - len(pending),
                 len(trials))
    prepared = objective.prepare(proto)  # on the driver, once (deterministic: the same on resume)
    if threads_per_trial is None and not isinstance(executor, LocalExecutor):
        threads_per_trial = executor.cpus_per_task
    shared_model, shared_prepared = executor.shared(model_bytes), executor.shared(prepared)
    calls = [(shared_model, calib, trial, objective, shared_prepared, threads_per_trial) for trial in pending]
    for done, (index, (record, quantized)) in enumerate(executor.map_unordered(run_trial, calls), 1):
        experiment.record(record, None if quantized is None else onnx.load_from_string(quantized))
        if progress is not None:
            progress(done, len(pending), record)
    records = experiment.records_in_order([t.trial_id for t in trials])
    best = None
    for trial, record in zip(trials, records):
        record["index"] = trial.index  # the order of this space (a journal may come from another order)
        record["violations"] = constraints.violations(record)
        record["feasible"] = record.get("error") is None and not record["violations"]
        if record["feasible"] and better(objective, record["score"], None if best is None else best["score"]):
            best = record
    result = SearchResult(objective.name, objective.higher_is_better, prepared["float_score"], records, best,
                          dropped, len(pending), time.perf_counter() - start, executor.name)
    result.write_csv(experiment.folder / "results.csv")
    result.write_html(experiment.folder / "results.html")
    if output is not None and best is not None:
        save_model(experiment.load_model(best["trial_id"]), output)
    return result


def _dropped_text(dropped: Dict[str, int]) -> str:
    return ", ".join(f"{n} {why}" for why, n in dropped.items() if n) or "no points"
