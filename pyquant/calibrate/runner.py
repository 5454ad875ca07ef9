"""Run the float model over calibration data and stream every planned activation, and
whatever else the techniques asked for, into collectors. One batch of activations is
alive at a time: onnxruntime returns the batch's tensors, the kernels absorb them, and
they are dropped before the next run."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Mapping, Optional, Sequence

import numpy as np
from onnx import ModelProto, TensorProto

from ..config import QuantConfig
from ..errors import CalibrationError, DataError
from ..graph.plan import QuantPlan
from ..graph.subgraphs import BRANCHES, InlinedBranch
from ..graph.view import GraphView
from ..runtime import BoundRunner, batch_count, check_feed, make_session, prefetch
from .collector import ChannelMeanCollector, NonFiniteValues, TensorCollector
from .loops import BodyCalibration, BodyMismatch, BodyStepper

ProgressCallback = Callable[[int, Optional[int]], None]  # (batches done, total or None)


@dataclasses.dataclass(frozen=True)
class StatisticsRequest:
    """What the techniques need from the calibration pass beyond every planned
    activation's range (which the parameter table always needs). Requests of several
    techniques are merged with ``|``, so that one pass collects all of them."""

    channel_means: Mapping[str, int] = dataclasses.field(default_factory=dict)  # tensor -> channel axis

    def __or__(self, other: "StatisticsRequest") -> "StatisticsRequest":
        means = dict(self.channel_means)
        for name, axis in other.channel_means.items():
            if means.setdefault(name, axis) != axis:
                raise ValueError(f"channel means of {name!r} asked for on axes {means[name]} and {axis}")
        return StatisticsRequest(means)


@dataclasses.dataclass
class Statistics:
    ranges: Dict[str, TensorCollector]  # every planned activation
    channel_means: Dict[str, ChannelMeanCollector]  # the tensors asked for
    batches: int
    # Loop/Scan node -> its body's planned activations (pyquant.calibrate.loops), for the
    # bodies stepped on every batch; the others: node -> why its body stays float
    bodies: Dict[str, Dict[str, TensorCollector]] = dataclasses.field(default_factory=dict)
    bodies_left: Dict[str, str] = dataclasses.field(default_factory=dict)


def collect(model: ModelProto, plan: QuantPlan, reader, config: QuantConfig,
            request: StatisticsRequest = StatisticsRequest(),
            progress: Optional[ProgressCallback] = None,
            conditions: Sequence[InlinedBranch] = (), loops: Sequence[BodyCalibration] = ()) -> Statistics:
    """Statistics of every planned activation over all batches of ``reader``, and those of
    ``request`` (each channel-mean tensor must be a planned activation). ``conditions``:
    the If nodes graph preparation inlined; each batch must take the branch inlined.
    ``loops``: Loop/Scan bodies whose planned activations are collected by stepping them
    on each batch (pyquant.calibrate.loops)."""
    view = GraphView(model)
    histogram = config.needs_histogram
    collectors = {name: TensorCollector(config.num_bins, histogram) for name in plan.activations}
    means = {name: ChannelMeanCollector(axis) for name, axis in request.channel_means.items()}
    missing = set(means) - set(collectors)
    if missing:
        raise ValueError(f"channel means asked for tensors that are not calibrated: {sorted(missing)}")
    for name in plan.constant_activations:
        collectors[name].update(view.constant_value(name))
    constants = set(plan.constant_activations)
    inputs = set(view.graph_inputs)
    fed = [n for n in plan.activations if n in inputs]  # read from the feed, not the session
    names = [n for n in plan.activations if n not in constants and n not in inputs]
    steppers, bodies_left = _steppers(view, loops, config)
    # what the bodies need from the main graph: extra outputs of the same run
    stepped = sorted({n for s in steppers for n in s.needs if not view.is_constant(n)} - set(names) - inputs)
    run_names = names + stepped
    session = make_session(model, run_names, output_types={n: view.elem_type[n] for n in stepped})
    runner = BoundRunner(session, run_names)
    total = batch_count(reader)
    batches = 0
    check_branches = BranchCheck(model, conditions) if conditions else None
    for feed in prefetch(reader):
        feed = check_feed(session, feed, batches)
        if check_branches is not None:
            check_branches(feed, batches)
        # Graph inputs first, then in graph order: a NaN is reported where it first appears.
        # (a model whose only quantized activations are its inputs needs no inference)
        computed = runner.run(feed) if run_names else []
        values = [feed[n] for n in fed] + computed[:len(names)]
        for name, value in zip(fed + names, values):
            try:
                collectors[name].update(value)
            except NonFiniteValues as e:
                producer = view.producer.get(name)
                where = f" (output of node {view.node_name(producer)})" if producer is not None else " (a model input)"
                raise CalibrationError(f"tensor {name!r}{where} has {e} in calibration batch {batches}") from None
            if name in means:
                means[name].update(value)
        if steppers:
            known = dict(zip(run_names, computed))
            known.update(feed)
            for stepper in list(steppers):
                try:
                    stepper.run({n: known[n] if n in known else view.constant_value(n) for n in stepper.needs},
                                batches)
                except BodyMismatch as e:
                    bodies_left[stepper.body.name] = f"{stepper.body.op_type} body stays float: {e}"
                    steppers.remove(stepper)
            del known
        del values, computed
        batches += 1
        if progress is not None:
            progress(batches, total)
    if batches == 0:
        raise DataError("the calibration data reader produced no batch")
    return Statistics(collectors, means, batches, {s.body.name: s.calibration.collectors for s in steppers},
                      bodies_left)


def _steppers(view: GraphView, loops: Sequence[BodyCalibration], config: QuantConfig):
    """A BodyStepper per body that loads by itself, and {node: why not} for the others."""
    steppers, left = [], {}
    for calibration in loops:
        name = calibration.body.name
        try:
            stepper = BodyStepper(calibration, config.num_bins, config.needs_histogram)
        except Exception as e:  # onnxruntime's errors have several types: any means "cannot load it"
            left[name] = (f"{calibration.body.op_type} body stays float: onnxruntime cannot load it by itself "
                          f"({str(e).strip().splitlines()[0]})")
            continue
        unknown = [n for n in stepper.needs if n not in view.elem_type and not view.is_constant(n)]
        if unknown:
            left[name] = f"{calibration.body.op_type} body stays float: the type of {unknown[0]!r} is unknown"
            continue
        steppers.append(stepper)
    return steppers, left


class BranchCheck:
    """Checks that a batch takes the branch of every inlined If (its condition is cheap:
    onnxruntime computes only what the condition needs)."""

    def __init__(self, model: ModelProto, inlined: Sequence[InlinedBranch]) -> None:
        self.inlined = list(inlined)
        self.names = sorted({b.cond for b in self.inlined})
        self.session = make_session(model, self.names, output_types={n: TensorProto.BOOL for n in self.names})

    def __call__(self, feed, batch: int) -> None:
        values = dict(zip(self.names, self.session.run(self.names, feed)))
        for b in self.inlined:
            value = np.asarray(values[b.cond])
            if value.size != 1 or bool(value.reshape(-1)[0]) is not b.value:
                raise CalibrationError(
                    f"If node {b.name!r} takes its {BRANCHES[not b.value]} in calibration batch {batch}, its "
                    f"{BRANCHES[b.value]} on the first batch: pyquant calibrates and quantizes the branch the "
                    "calibration data takes; give data that takes one branch, or keep the If in float with "
                    f"nodes_to_exclude=[{b.name!r}]")
