"""NPU CNN rules as one constraint problem over the whole graph (enable_npu_cnn with
power-of-two scales): the fix-point positions of the parameter table are moved, jointly,
to the legal positions with the least loss of quantization MSE (pyquant.npu.solver), and
every moved position is reported with the rule that moved it. Runs first among the
PARAMETERS techniques, so that bias correction and fast finetune work on the final scales.

With int32_bias=False a second step, NpuBiasPositions, runs last (when the biases are
final): each int8 bias takes the position with the least rounding error within the
shift_bias limits.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional

import numpy as np

from ..config import QuantConfig
from ..graph.view import GraphView
from ..npu.positions import apply_positions, best_int8_position, build_problem, fused_end
from ..npu.rules import GENERATIONS, DEFAULT_GENERATION, NpuRules, position_of
from ..npu.solver import Move, joint, moves, node_at_a_time
from ..qparams import QParams
from .base import QuantState, Stage, Technique

log = logging.getLogger(__name__)

# The rule set the solver keeps: the shift limits are the same in every known generation
# (pyquant.npu.rules), which differ in rounding only, a matter of the emulator.
RULES = GENERATIONS[DEFAULT_GENERATION]


@dataclasses.dataclass
class NpuPositionReport:
    """What the joint solver did, and what the node-at-a-time repair would have cost."""

    rules: str
    variables: int
    constraints: int
    violations_at_calibration: int  # rules broken by the calibration-optimal positions
    node_at_a_time_loss: float  # total relative MSE loss of the reference's repair
    node_at_a_time_violations: int
    joint_loss: float
    joint_violations: int
    moves: List[Move]
    bias_moves: List[Move] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        return (f"NPU positions ({self.rules}): {self.variables} positions, {self.constraints} rules, "
                f"{self.violations_at_calibration} broken at calibration; node-at-a-time loss "
                f"{self.node_at_a_time_loss:.4g} ({self.node_at_a_time_violations} left), joint loss "
                f"{self.joint_loss:.4g} ({self.joint_violations} left); {len(self.moves)} position(s) moved"
                + (f", {len(self.bias_moves)} bias position(s) limited" if self.bias_moves else "")
                + "".join(f"\n  {m.describe()}" for m in self.moves + self.bias_moves))


def _note(state: QuantState, tensor: str, text: str) -> None:
    state.table.notes.setdefault(tensor, []).append(text)


class NpuPositions(Technique):
    name = "npu_positions"
    stage = Stage.PARAMETERS

    def __init__(self, rules: NpuRules) -> None:
        self.rules = rules

    @classmethod
    def from_config(cls, config: QuantConfig) -> Optional["NpuPositions"]:
        return cls(RULES) if config.enable_npu_cnn and config.power_of_two else None

    def apply(self, state: QuantState) -> None:
        pp = build_problem(state.model, state.plan, state.table, state.statistics.ranges, state.config, self.rules)
        problem = pp.problem
        at_start = problem.violations(problem.start())
        baseline = node_at_a_time(problem)
        solution = joint(problem, baseline.positions)
        if solution.violations:
            for c in solution.violations:
                log.warning("NPU rule left violated: %s", c.describe(problem.variables, solution.positions))
        moved = moves(problem, solution.positions)
        apply_positions(pp, solution.positions, state.model, state.plan, state.table, state.config)
        for m in moved:
            log.info("NPU rules moved %s", m.describe())
            _note(state, m.name, f"{m.kind} position {m.before} -> {m.after}: {'; '.join(m.reasons)}")
        report = NpuPositionReport(self.rules.name, len(problem.variables), len(problem.constraints), len(at_start),
                                   baseline.loss, len(baseline.violations), solution.loss,
                                   len(solution.violations), moved)
        state.reports[self.name] = report
        log.info(report.summary())


class NpuBiasPositions(Technique):
    """int8 biases (int32_bias=False): each bias's position within the shift_bias limits."""

    name = "npu_bias_positions"
    stage = Stage.PARAMETERS

    def __init__(self, rules: NpuRules) -> None:
        self.rules = rules

    @classmethod
    def from_config(cls, config: QuantConfig) -> Optional["NpuBiasPositions"]:
        return None if config.int32_bias else cls(RULES)

    def apply(self, state: QuantState) -> None:
        view = GraphView(state.model)
        planned = set(state.plan.activations)
        limited: List[Move] = []
        weight_uses = {id(u.node): u for u in state.plan.weights}
        for use in state.plan.biases:
            node = use.node
            bias = view.constant_value(node.input[use.input_index])
            act = state.table.activations.get(use.activation)
            weight_use = weight_uses.get(id(node))
            if act is None or bias is None or weight_use is None:
                continue
            accumulator = position_of(float(act.scale)) + position_of(
                float(state.table.weight(weight_use, state.config.per_channel).qparams.scale))
            lowest = accumulator - self.rules.shift_bias_max
            out = fused_end(view, node.output[0], planned)
            highest = None
            if out is not None:
                highest = position_of(float(state.table.activations[out].scale)) + self.rules.shift_bias_cut_offset
            best = best_int8_position(bias)
            chosen = max(best, lowest) if highest is None else min(max(best, lowest), highest)
            state.table.biases[node.output[0]] = QParams(np.array(2.0 ** -chosen, dtype=np.float32),
                                                         np.array(0, dtype=np.int8))
            if chosen != best:
                why = (f"shift_bias = {accumulator - best} > {self.rules.shift_bias_max}" if best < lowest else
                       f"shift_bias = {accumulator - best} < shift_cut - {self.rules.shift_bias_cut_offset}")
                move = Move(node.input[use.input_index], "bias", best, chosen, (f"{why} at {view.node_name(node)}",))
                limited.append(move)
                _note(state, node.output[0], f"bias position {best} -> {chosen}: {move.reasons[0]}")
        report = state.reports.get(NpuPositions.name)
        if isinstance(report, NpuPositionReport):
            report.bias_moves = limited
        else:
            state.reports[self.name] = f"{len(state.plan.biases)} int8 biases, {len(limited)} position(s) limited"
