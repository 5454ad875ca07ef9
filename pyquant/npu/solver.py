"""Fix-point positions under an NPU's shift limits, chosen jointly for the whole graph.

Every power-of-two scale of a model is a position p (scale 2^-p): one per scale-sharing
group of activations, one per weight, one per int8 bias. A Constraint is one rule of
pyquant.npu.rules at one node, a bound on a sum of positions (shift_cut = p_in + p_w -
p_out in [0, 16], |p_a - p_b| <= 7 at an Add, ...). Each variable has a cost per position:
the increase of its quantization MSE over the calibration-optimal position, relative to the
tensor's mean square, so that an activation, a weight and a bias count in the same unit.

Two solvers, both reported:

* node_at_a_time: the reference tool's refine pass. Nodes in graph order; a violated rule
  moves one designated position (the weight for shift_cut, the bias for shift_bias, the
  finer Add input, the output of a Mul) to the nearest legal value; passes repeat until no
  rule is violated.
* joint: starting from that feasible solution, a steepest descent on the total loss. A move changes
  one shared position (an activation group, or a weight used twice) and re-chooses, for
  every node it touches, that node's private positions (its weight and bias) optimally
  given the shared ones; a move is taken only if every rule stays satisfied and the total
  loss falls. It never ends above node_at_a_time's loss (it starts there and only
  descends), and it finds what one node cannot see: e.g. that a coarser output position
  costs less than a finer, clipping weight.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

# Positions searched around each variable's calibration-optimal one (each side).
WINDOW = 8
# Steps of the joint descent at most (each step tries every shared variable, takes the best move).
MAX_STEPS = 500
# Passes of the node-at-a-time repair at most.
MAX_PASSES = 20
# A joint move must lower the total loss by more than this (relative MSE units).
MIN_GAIN = 1e-12


@dataclasses.dataclass
class Variable:
    """One position: its name (tensor, weight or bias), kind, start (the position the
    calibration chose) and the cost of each position in ``positions``."""

    name: str
    kind: str  # "activation", "weight" or "bias"
    start: int
    positions: np.ndarray
    costs: np.ndarray

    def cost(self, p: int) -> float:
        i = p - int(self.positions[0])
        return float(self.costs[i]) if 0 <= i < len(self.costs) else math.inf


@dataclasses.dataclass(frozen=True)
class Constraint:
    """lo <= sum(coefficient * position) <= hi at ``node``; with ``min_of_first_two`` the
    first two terms are replaced by the smaller of their positions (an Add's shift_write).
    ``fix`` is the variable the node-at-a-time repair moves."""

    rule: str
    node: str
    variables: Tuple[int, ...]
    coefficients: Tuple[int, ...]
    lo: int
    hi: int
    fix: int
    min_of_first_two: bool = False

    def value(self, p: Sequence[int]) -> int:
        if self.min_of_first_two:
            rest = sum(c * p[v] for v, c in zip(self.variables[2:], self.coefficients[2:]))
            return min(p[self.variables[0]], p[self.variables[1]]) + rest
        return sum(c * p[v] for v, c in zip(self.variables, self.coefficients))

    def satisfied(self, p: Sequence[int]) -> bool:
        return self.lo <= self.value(p) <= self.hi

    def describe(self, variables: Sequence[Variable], p: Sequence[int]) -> str:
        return f"{self.rule} = {self.value(p)} at {self.node} (allowed [{self.lo}, {self.hi}])"


@dataclasses.dataclass
class Problem:
    variables: List[Variable]
    constraints: List[Constraint]  # in graph order

    def start(self) -> List[int]:
        return [v.start for v in self.variables]

    def loss(self, p: Sequence[int]) -> float:
        return float(sum(v.cost(x) for v, x in zip(self.variables, p)))

    def violations(self, p: Sequence[int]) -> List[Constraint]:
        return [c for c in self.constraints if not c.satisfied(p)]


@dataclasses.dataclass(frozen=True)
class Move:
    """A position the solver changed, and why."""

    name: str
    kind: str
    before: int
    after: int
    reasons: Tuple[str, ...]

    def describe(self) -> str:
        return f"{self.kind} {self.name}: position {self.before} -> {self.after} ({'; '.join(self.reasons)})"


@dataclasses.dataclass
class Solution:
    positions: List[int]
    loss: float
    violations: List[Constraint]


def node_at_a_time(problem: Problem) -> Solution:
    """The reference's refine pass: each violated rule, in graph order, moves its ``fix``
    variable to the nearest legal value; repeated until nothing is violated."""
    p = problem.start()
    for _ in range(MAX_PASSES):
        changed = False
        for c in problem.constraints:
            value = c.value(p)
            if c.lo <= value <= c.hi:
                continue
            target = c.lo if value < c.lo else c.hi
            coefficient = c.coefficients[c.variables.index(c.fix)]
            p[c.fix] += (target - value) * coefficient  # coefficients are +-1
            changed = True
        if not changed:
            break
    return Solution(p, problem.loss(p), problem.violations(p))


def joint(problem: Problem, start: Optional[Sequence[int]] = None) -> Solution:
    """Descent on the total loss from ``start`` (default: node_at_a_time's solution),
    keeping every rule satisfied (see the module docstring)."""
    p = list(start) if start is not None else node_at_a_time(problem).positions
    if problem.violations(p):  # descent keeps feasibility; it cannot create it
        return Solution(p, problem.loss(p), problem.violations(p))
    touching: Dict[int, List[Constraint]] = {}
    for c in problem.constraints:
        for v in set(c.variables):
            touching.setdefault(v, []).append(c)
    nodes_of = {v: {c.node for c in cs} for v, cs in touching.items()}
    private = {v for v, nodes in nodes_of.items() if len(nodes) == 1 and problem.variables[v].kind != "activation"}
    by_node: Dict[str, List[Constraint]] = {}
    for c in problem.constraints:
        by_node.setdefault(c.node, []).append(c)
    privates_of = {node: sorted({v for c in cs for v in c.variables if v in private}) for node, cs in by_node.items()}
    memo: Dict[Tuple[str, Tuple[int, ...]], Optional[Tuple[float, Tuple[int, ...]]]] = {}

    def best_privates(node: str) -> Optional[Tuple[float, Tuple[int, ...]]]:
        """The cheapest legal positions of the node's private variables, given the others."""
        own = privates_of[node]
        shared = tuple(sorted({v for c in by_node[node] for v in c.variables} - set(own)))
        key = (node, tuple(p[v] for v in shared))
        if key not in memo:
            best = None
            saved = [p[v] for v in own]
            # nearest to the calibration's choice first: among equal losses that one is kept
            windows = [sorted(problem.variables[v].positions.tolist(), key=lambda x, v=v: abs(x - problem.variables[v].start))
                       for v in own]
            for combo in itertools.product(*windows):
                cost = sum(problem.variables[v].cost(int(x)) for v, x in zip(own, combo))
                if best is not None and cost >= best[0]:
                    continue
                for v, x in zip(own, combo):
                    p[v] = int(x)
                if all(c.satisfied(p) for c in by_node[node]):
                    best = (cost, tuple(int(x) for x in combo))
            for v, x in zip(own, saved):
                p[v] = x
            memo[key] = best
        return memo[key]

    for node, own in privates_of.items():  # the best private positions for the start
        if own:
            found = best_privates(node)
            if found is not None and found[0] < sum(problem.variables[v].cost(p[v]) for v in own):
                for v, x in zip(own, found[1]):
                    p[v] = x
    shared_vars = [v for v in range(len(problem.variables)) if v not in private and v in touching]

    def local(v: int, x: int) -> Optional[Tuple[float, Dict[str, Tuple[int, ...]]]]:
        """Loss of variable v at x plus the best private losses of its nodes; None if illegal."""
        saved = p[v]
        p[v] = x
        total, chosen = problem.variables[v].cost(x), {}
        try:
            for node in sorted(nodes_of[v]):
                if privates_of[node]:
                    found = best_privates(node)
                    if found is None:
                        return None
                    total += found[0]
                    chosen[node] = found[1]
                elif not all(c.satisfied(p) for c in by_node[node]):
                    return None
            return total, chosen
        finally:
            p[v] = saved

    # steepest descent: each step takes the single move with the largest gain
    for _ in range(MAX_STEPS):
        best_gain, best_move = MIN_GAIN, None
        for v in shared_vars:
            here = local(v, p[v])
            if here is None:
                continue
            for x in problem.variables[v].positions.tolist():
                if x == p[v]:
                    continue
                found = local(v, x)
                if found is not None and here[0] - found[0] > best_gain:
                    best_gain, best_move = here[0] - found[0], (v, x, found[1])
        if best_move is None:
            break
        v, x, chosen = best_move
        p[v] = x
        for node, combo in chosen.items():
            for w, value in zip(privates_of[node], combo):
                p[w] = value
    return Solution(p, problem.loss(p), problem.violations(p))


def moves(problem: Problem, positions: Sequence[int]) -> List[Move]:
    """Every variable whose position differs from its start, with the rules that made it
    move: those it violated at the start, or, moved only to let others satisfy theirs at
    less loss, the rules it shares with them."""
    start = problem.start()
    moved = {v for v, (a, b) in enumerate(zip(start, positions)) if a != b}
    out = []
    for v in sorted(moved):
        involved = [c for c in problem.constraints if v in c.variables]
        violated = [c.describe(problem.variables, start) for c in involved if not c.satisfied(start)]
        if violated:
            reasons = tuple(violated)
        else:
            reasons = tuple(f"{c.rule} at {c.node} with " + ", ".join(
                problem.variables[w].name for w in c.variables if w != v and w in moved)
                for c in involved if any(w != v and w in moved for w in c.variables)) or ("lower total loss",)
        var = problem.variables[v]
        out.append(Move(var.name, var.kind, var.start, int(positions[v]), reasons))
    return out
