"""The quantization pipeline: prepare, run the techniques around one calibration pass,
write the QDQ model.

    prepare (pyquant.preparation: opset upgrade, the If branches the data takes inlined,
             float-exact rewrites checked on a batch)
      -> GRAPH techniques (CLE, ...) on the float model, with a few peeked samples
      -> plan (which tensors get QDQ pairs, which share a scale)
      -> calibration: one pass collecting every planned activation's statistics and
         what each PARAMETERS technique asked for
      -> the parameter table (activations and weights, computed once)
      -> PARAMETERS techniques (bias correction, fast finetune, ...)
      -> QDQ model from the table, the inlined If nodes folded back (pyquant.graph.subgraphs)

Loop and Scan bodies (pyquant.graph.loops) are planned, tabled and written by the same
steps as models of their own, calibrated in the same pass by stepping them
(pyquant.calibrate.loops), and put back into their nodes; the techniques work on the
main graph.

The techniques and their order are pyquant.techniques.REGISTRY; the pipeline knows none
of them by name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import operator
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import onnx
from onnx import ModelProto

from . import threads
from .calibrate.loops import BodyCalibration
from .calibrate.runner import Statistics, StatisticsRequest, collect
from .calibrate.table import build_table, concat_starved, outlier_dominated
from .config import QuantConfig
from .errors import ModelError
from .graph.plan import NEAR_INFINITE, QuantPlan
from .graph.qdq import write_qdq
from .graph.loops import NESTED_REASON, LoopBody, extract_bodies, restore_bodies
from .graph.subgraphs import defined_names, fold_branches, if_outputs
from .qparams import QuantTable
from .report import RunReport, run_report
from .preparation import prepare_graph
from .runtime import Feed, PeekedReader, RebatchedReader, SpillingReader, require_rewind
from .techniques import Callbacks, QuantState, Stage, techniques_for

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class QuantizeResult:
    model: ModelProto
    plan: QuantPlan
    table: QuantTable
    reports: Dict[str, Any]  # technique name -> its report (e.g. "fast_finetune": FinetuneReport)
    report: RunReport  # what stayed float and why, what preparation changed
    seconds_calibration: float
    seconds_total: float
    # with keep_float_model: the prepared float model after the GRAPH techniques (CLE), before
    # the PARAMETERS ones changed its biases; the QDQ model is written from it plus the table
    float_model: Optional[ModelProto] = None


def prepare(model: ModelProto, feeds: Sequence[Feed] = ()) -> ModelProto:
    """The prepared copy of ``model`` (pyquant.preparation), checked on ``feeds`` if given."""
    return prepare_graph(model, feeds)[0]


def _calibration_reader(reader, config: QuantConfig):
    """``reader`` in batches of config.calib_batch_size (when set and not already so)."""
    size = config.calib_batch_size
    if size is None or getattr(reader, "batch_size", None) == size:
        return reader
    return RebatchedReader(reader, size)


def _keep_near_infinite_in_float(state: QuantState) -> None:
    """Activations that reached near-infinite values in calibration (an attention score
    with its mask added) stay float: one 8-bit scale cannot hold both the mask and the data
    (a transformer's XINT8 scale of 5.3e36 destroyed it). The plan is made again without them."""
    huge = {name: f"reached |x| = {c.abs_max:.3g} in calibration (>= {NEAR_INFINITE:g}: a mask or sentinel)"
            for name, c in state.statistics.ranges.items() if c.count and c.abs_max >= NEAR_INFINITE}
    if huge:
        for name, reason in huge.items():
            log.info("leaving tensor %s in float: %s", name, reason)
        state.keep_float.update(huge)
        state.replan()


def _keep_outlier_dominated_in_float(state: QuantState) -> None:
    """Tensors summed into a per-token normalisation whose scale a few outliers set so
    coarse that the rest of the tensor is lost (pyquant.calibrate.table.outlier_dominated),
    and Concats whose one shared scale would lose an input (concat_starved), stay float;
    the plan and the table are made again without them."""
    dominated = outlier_dominated(state.model, state.plan, state.statistics.ranges, state.table.activations)
    dominated.update(concat_starved(state.model, state.plan, state.statistics.ranges, state.table.activations,
                                    state.config))
    for name in state.config.tensor_types:  # the user chose these tensors' precision
        dominated.pop(name, None)
    if dominated:
        for name, reason in dominated.items():
            log.info("leaving tensor %s in float: %s", name, reason)
        state.keep_float.update(dominated)
        state.replan()
        state.table = build_table(state.model, state.plan, state.statistics.ranges, state.config)


def _scoped_configs(config: QuantConfig, bodies: Sequence[LoopBody]) -> Tuple[QuantConfig, List[QuantConfig]]:
    """``config`` for the main graph and for each body: each plan sees the node exclusions
    and tensor types that name its own nodes and tensors (names are unique across scopes;
    a main-graph activation a body reads is the main graph's and that body's)."""
    own = [defined_names(body.model.graph) - set(body.outer) - set(body.copied) for body in bodies]

    def scoped(keep_node, keep_tensor) -> QuantConfig:
        return dataclasses.replace(
            config, nodes_to_exclude=frozenset(n for n in config.nodes_to_exclude if keep_node(n)),
            tensor_types={t: q for t, q in config.tensor_types.items() if keep_tensor(t)})

    main = scoped(lambda n: not any(n in body.node_names for body in bodies),
                  lambda t: not any(t in tensors for tensors in own))
    return main, [scoped(body.node_names.__contains__, lambda t, mine=tensors, outer=set(body.outer):
                         t in mine or t in outer) for body, tensors in zip(bodies, own)]


def _body_states(state: QuantState, bodies: Sequence[LoopBody]) -> List[QuantState]:
    """A QuantState per body (its own plan, the main graph's rules); the main state's
    configuration becomes the main graph's share."""
    state.config, configs = _scoped_configs(state.config, bodies)
    states = []
    for body, config in zip(bodies, configs):
        # the user's tensor_types quantize a carried state or scan output anyway
        keep = {t: why for t, why in body.keep_float.items() if t not in config.tensor_types}
        states.append(QuantState(body.model, config, None, state.callbacks, keep_float=keep))
        states[-1].replan()
    return states


def _write_bodies(state: QuantState, bodies: Sequence[LoopBody], body_states: Sequence[QuantState]
                  ) -> Tuple[List[Tuple[LoopBody, ModelProto]], Dict[str, str]]:
    """The calibrated bodies written by the main graph's rules (near-infinite and
    outlier-dominated tensors stay float there too); {node: reason} for those left float."""
    written, left = [], dict(state.statistics.bodies_left)
    for body, body_state in zip(bodies, body_states):
        ranges = state.statistics.bodies.get(body.name)
        if ranges is None:
            continue
        body_state.statistics = Statistics(ranges, {}, state.statistics.batches)
        _keep_near_infinite_in_float(body_state)
        body_state.table = build_table(body_state.model, body_state.plan, ranges, body_state.config)
        _keep_outlier_dominated_in_float(body_state)
        written.append((body, write_qdq(body_state.model, body_state.plan, body_state.table, body_state.config)))
        log.info("%s node %s: body calibrated over every iteration, %d activations quantized", body.op_type,
                 body.name, len(body_state.plan.activations))
    return written, left


def _report_bodies(plan: QuantPlan, bodies: Sequence[LoopBody], body_states: Sequence[QuantState],
                   written: Sequence[Tuple[LoopBody, ModelProto]]) -> None:
    """A quantized body's node is no longer float as a whole: its nodes and tensors that
    stayed float are reported as ``node/body node`` and by tensor name."""
    quantized = {body.name for body, _ in written}
    for body, body_state in zip(bodies, body_states):
        if body.name in quantized:
            plan.skipped.pop(body.name, None)
            plan.skipped.update({f"{body.name}/{n}": NESTED_REASON if n in body.nested else why
                                 for n, why in body_state.plan.skipped.items()})
            plan.float_tensors.update(body_state.plan.float_tensors)


def quantize_model(model: ModelProto, reader, config: QuantConfig, callbacks: Callbacks = Callbacks(),
                   collect_statistics: Callable[..., Statistics] = collect,
                   keep_float_model: bool = False) -> QuantizeResult:
    """Quantize an in-memory float model with calibration data from ``reader`` (an object
    with get_next(); rewind() too when a technique reads the data twice).

    ``collect_statistics`` runs the calibration pass (``collect``'s signature); e.g.
    pyquant.calibrate.sharded.ShardedCalibration collects shards of the data on workers.
    ``keep_float_model``: the result holds the float model the QDQ model corresponds to
    (one more copy of the model in memory; the sensitivity analysis needs it)."""
    start = time.perf_counter()
    techniques = techniques_for(config)
    graph_stage = [t for t in techniques if t.stage is Stage.GRAPH]
    parameter_stage = [t for t in techniques if t.stage is Stage.PARAMETERS]
    rereaders = [t.name for t in techniques if t.rereads_data]
    if rereaders:  # before any work, on the reader as given
        require_rewind(reader, " and ".join(rereaders))
    with threads.budget(config.threads), contextlib.ExitStack() as cleanup:
        # a look at real data before calibration: one batch checks the graph preparation,
        # the GRAPH techniques ask for more; the batches are replayed to calibration
        samples = max([1] + [t.samples_needed() for t in graph_stage])
        source = _calibration_reader(reader, config)
        if rereaders:  # the second pass replays the first one's batches from a file
            source = cleanup.enter_context(contextlib.closing(SpillingReader(source)))
        peeked = PeekedReader(source, samples)
        prepared, preparation = prepare_graph(model, peeked.peeked[:1], config.min_opset,
                                              keep_control_flow=config.nodes_to_exclude)
        state = QuantState(prepared, config, peeked, callbacks, samples=peeked.peeked)
        state.reports["preparation"] = preparation
        # If outputs stay float, but those the user gave a type (tensor_types)
        state.keep_float.update({t: why for t, why in if_outputs(prepared, preparation.inlined).items()
                                 if t not in config.tensor_types})
        for technique in graph_stage:
            technique.apply(state)
        state.samples = []
        peeked.peeked.clear()  # the batches stay queued for calibration only
        bodies, unsteppable = extract_bodies(state.model, preparation.control_flow_left)
        body_states = _body_states(state, bodies)
        state.replan()
        request = functools.reduce(operator.or_, (t.statistics_needed(state) for t in parameter_stage),
                                   StatisticsRequest())
        if keep_float_model or any(t.needs_float_model for t in parameter_stage):
            state.float_model = ModelProto()
            state.float_model.CopyFrom(state.model)
        t0 = time.perf_counter()
        state.statistics = collect_statistics(state.model, state.plan, state.reader, state.config, request,
                                              callbacks.calibration, conditions=preparation.inlined,
                                              loops=[BodyCalibration(b, s.plan) for b, s in zip(bodies, body_states)])
        seconds_calibration = time.perf_counter() - t0
        _keep_near_infinite_in_float(state)
        state.table = build_table(state.model, state.plan, state.statistics.ranges, state.config)
        _keep_outlier_dominated_in_float(state)
        for technique in parameter_stage:
            technique.apply(state)
        float_model = state.float_model if keep_float_model else None
        state.float_model = None
        written, bodies_left = _write_bodies(state, bodies, body_states)
        quantized = write_qdq(state.model, state.plan, state.table, state.config)
        if written:  # before folding: a Loop may sit in an inlined If branch
            quantized = restore_bodies(quantized, written)
        if preparation.inlined:  # the If nodes back, each with its quantized branch
            quantized = fold_branches(quantized, preparation.inlined)
        for node, why in {**preparation.control_flow_left, **unsteppable, **bodies_left}.items():
            if node in state.plan.skipped:
                state.plan.skipped[node] = why
        _report_bodies(state.plan, bodies, body_states, written)
    try:
        onnx.checker.check_model(quantized)
    except onnx.checker.ValidationError as e:  # a bug of ours, not of the user's model
        raise ModelError(f"internal error: the quantized model is invalid: {str(e).splitlines()[0]}") from None
    written_names = {body.name for body, _ in written}
    report = run_report(state.model, state.plan, state.reports,
                        [s.plan for b, s in zip(bodies, body_states) if b.name in written_names])
    report.log()
    return QuantizeResult(quantized, state.plan, state.table, state.reports, report, seconds_calibration,
                          time.perf_counter() - start, float_model)
