"""Calibration of Loop and Scan bodies: each body (pyquant.graph.loops.LoopBody, a model
of its own) runs in its own onnxruntime session, iteration by iteration, on the values
the main graph gives its node in a calibration batch; each iteration's planned body
tensors go to the same streaming collectors as the main graph's, and are dropped before
the next iteration. Memory holds one iteration's tensors, whatever the trip count or the
number of batches.

The loop is followed as ONNX defines it: a Loop stops after its trip count M or when the
body returns a false condition, whichever comes first (so a data-dependent condition is
followed on every batch); a Scan iterates over its scan inputs' axis in each input's
direction. The main graph still runs the node itself; the stepped run's final state is
compared with the node's outputs on every batch, and a body whose stepping does not
reproduce them stays float, reported, as does one that fails to run by itself.

Cost: each iteration is one session.run of the body (~tens of microseconds of overhead
on top of its arithmetic) besides the node's own run inside the main graph.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping

import numpy as np

from ..errors import CalibrationError
from ..graph.loops import LoopBody
from ..graph.plan import QuantPlan
from ..graph.view import GraphView, attribute
from ..runtime import make_session
from .collector import NonFiniteValues, TensorCollector

# The stepped final state must equal the node's outputs to this (relative to the largest
# |value|; both runs are float32 with the same kernels, so only the order of a few sums
# may differ).
STATE_MATCH_RTOL = 1e-4


@dataclasses.dataclass
class BodyCalibration:
    """A body, its plan and the collectors of its planned activations."""

    body: LoopBody
    plan: QuantPlan
    collectors: Dict[str, TensorCollector] = dataclasses.field(default_factory=dict)


class BodyMismatch(Exception):
    """Stepping the body did not reproduce the node's outputs, or it failed to run."""


class BodyStepper:
    """Runs one body iteration by iteration and feeds its collectors."""

    def __init__(self, calibration: BodyCalibration, num_bins: int, histogram: bool) -> None:
        self.calibration = calibration
        body, plan = calibration.body, calibration.plan
        view = GraphView(body.model)
        self.body = body
        inputs = {i.name for i in body.model.graph.input}
        constants = set(plan.constant_activations)
        calibration.collectors = {name: TensorCollector(num_bins, histogram) for name in plan.activations}
        for name in constants:
            calibration.collectors[name].update(view.constant_value(name))
        self.fed = [n for n in plan.activations if n in inputs]
        outputs = body.outputs
        self.extra = [n for n in plan.activations if n not in constants and n not in inputs and n not in outputs]
        self.run_names = outputs + self.extra
        self.session = make_session(body.model, self.extra)
        self.input_ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}

    @property
    def needs(self) -> List[str]:
        """Main-graph tensors the stepping reads: the node's inputs, the body's outer
        references and the node's state outputs (to check the stepped final state)."""
        node = self.body.node
        return [n for n in list(node.input) + self.body.outer + list(node.output)[:self.body.state_count] if n]

    def _scalar(self, name: str, value) -> np.ndarray:
        return np.array(value).reshape([1] * self.input_ranks[name])

    def _absorb(self, feed: Mapping[str, np.ndarray], outputs: List[np.ndarray], where: str) -> None:
        values = dict(zip(self.run_names, outputs))
        collectors = self.calibration.collectors
        for name in self.fed + self.extra:
            value = feed[name] if name in feed else values[name]
            try:
                collectors[name].update(value)
            except NonFiniteValues as e:
                raise CalibrationError(f"tensor {name!r} (in the body of {self.body.op_type} node "
                                       f"{self.body.name}, {where}) has {e}") from None

    def run(self, values: Mapping[str, np.ndarray], batch: int) -> int:
        """Step the body on one batch (``values``: every name of ``needs``); the number of
        iterations. BodyMismatch if it fails or does not reproduce the node's outputs."""
        outer = {n: values[n] for n in self.body.outer}
        try:
            if self.body.op_type == "Loop":
                iterations, state = self._loop(values, outer, batch)
            else:
                iterations, state = self._scan(values, outer, batch)
        except CalibrationError:
            raise
        except Exception as e:  # onnxruntime's errors have several types: any means "cannot step it"
            raise BodyMismatch(f"its body failed to run by itself in calibration batch {batch} "
                               f"({str(e).strip().splitlines()[0]})") from None
        results = list(self.body.node.output)[:len(state)]
        for name, got in zip(results, state):
            if name and not _close(values[name], got):
                raise BodyMismatch(f"stepping its body did not reproduce its output {name!r} in calibration "
                                   f"batch {batch} (after {iterations} iterations)")
        return iterations

    def _loop(self, values, outer, batch: int):
        node, names = self.body.node, self.body.inputs
        trips = int(np.asarray(values[node.input[0]]).reshape(-1)[0]) if node.input[0] else None
        cond = bool(np.asarray(values[node.input[1]]).reshape(-1)[0]) if len(node.input) > 1 and node.input[1] \
            else True
        state = [values[n] for n in node.input[2:]]
        i = 0
        while (trips is None or i < trips) and cond:
            feed = {names[0]: self._scalar(names[0], np.int64(i)), names[1]: self._scalar(names[1], np.bool_(cond))}
            feed.update(zip(names[2:], state))
            feed.update(outer)
            outputs = self.session.run(self.run_names, feed)
            self._absorb(feed, outputs, f"iteration {i} of calibration batch {batch}")
            cond = bool(np.asarray(outputs[0]).reshape(-1)[0])
            state = outputs[1:1 + len(state)]
            i += 1
        return i, state

    def _scan(self, values, outer, batch: int):
        node, names = self.body.node, self.body.inputs
        count = self.body.state_count
        state = [values[n] for n in node.input[:count]]
        scans = [np.asarray(values[n]) for n in node.input[count:]]
        axes = attribute(node, "scan_input_axes") or [0] * len(scans)
        directions = attribute(node, "scan_input_directions") or [0] * len(scans)
        axes = [a % s.ndim for a, s in zip(axes, scans)]
        length = scans[0].shape[axes[0]]
        for t in range(length):
            feed = dict(zip(names[:count], state))
            for name, s, axis, reverse in zip(names[count:], scans, axes, directions):
                feed[name] = np.take(s, length - 1 - t if reverse else t, axis=axis)
            feed.update(outer)
            outputs = self.session.run(self.run_names, feed)
            self._absorb(feed, outputs, f"iteration {t} of calibration batch {batch}")
            state = outputs[:count]
        return length, state


def _close(expected, got) -> bool:
    expected, got = np.asarray(expected), np.asarray(got)
    if expected.shape != got.shape:
        return False
    if expected.dtype.kind != "f":
        return bool(np.array_equal(expected, got))
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return bool(np.all(np.abs(expected.astype(np.float64) - got) <= STATE_MATCH_RTOL * max(scale, 1e-6)))

