"""The position problem of one model (pyquant.npu.solver.Problem) built from its plan, its
parameter table and its calibration histograms, and the solution written back to the table.

Variables: one per scale-sharing group of activations (Concat, pooling and data movement
already share one scale through the plan), one per weight, and with int8 biases one per
bias. Rules per node (pyquant.npu.rules):

  Conv/Gemm/MatMul  shift_cut  = p_in + p_w - p_out          in rules.shift_cut
                    shift_bias = p_in + p_w - p_bias          <= rules.shift_bias_max and,
                                 since shift_cut <= 16, >= shift_cut - 16, i.e. p_bias - p_out <= 16
  Add (two inputs)  p_a - p_b                                 in [-7, 7]
                    min(p_a, p_b) - p_out (shift_write)       in rules.add_shift_write
  Mul (two inputs)  p_a + p_b - p_out                         in rules.mul_shift

p_out is the position of the tensor the layer hands on: after a fused Relu/Clip, the
activation's output. A layer whose output stays float has no shift_cut rule.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Mapping, Optional

import numpy as np
from onnx import ModelProto

from .. import kernels
from ..calibrate.collector import TensorCollector
from ..config import QuantConfig
from ..graph.plan import QuantPlan
from ..graph.view import GraphView
from ..qparams import QParams, QuantizedWeight, QuantTable, WeightKey, quantize_array, weight_key
from .rules import NpuRules, position_of
from .solver import WINDOW, Constraint, Problem, Variable

# Ops a layer's output passes through before it is quantized (fused activations).
_FUSED = ("Relu", "Clip", "Min", "Max")
_INT8_MIN, _INT8_MAX = -128, 127


@dataclasses.dataclass
class PositionProblem:
    """The problem and what each variable stands for."""

    problem: Problem
    groups: Dict[int, int]  # variable -> index in plan.groups
    weights: Dict[int, WeightKey]  # variable -> table key
    biases: Dict[int, str]  # variable -> layer output (the key of QuantTable.biases)


def fused_end(view: GraphView, name: str, planned: set) -> Optional[str]:
    """The quantized tensor a layer's output ``name`` becomes (through fused Relu/Clip), or None."""
    while name not in planned:
        nxt = view.single_consumer(name)
        if nxt is None or nxt.op_type not in _FUSED or nxt.input[0] != name:
            return None
        name = nxt.output[0]
    return name


def _relative_costs(errors: np.ndarray, start_index: int, signal: float) -> np.ndarray:
    """Loss of each candidate against the start, relative to the signal; never negative
    (a position the calibration did not choose is not a gain by itself)."""
    return np.maximum(errors - errors[start_index], 0.0) / max(signal, 1e-300)


def _window(start: int) -> np.ndarray:
    return np.arange(start - WINDOW, start + WINDOW + 1)


def activation_variable(name: str, collector: TensorCollector, qp: QParams, qmin: int, qmax: int) -> Variable:
    start = position_of(float(qp.scale))
    positions = _window(start)
    zp = float(qp.zero_point)
    if collector.hist is None or collector.count == 0:
        return Variable(name, "activation", start, positions, np.zeros(len(positions)))
    errors = kernels.histogram_quant_errors(collector.hist, collector.lo, collector.hi,
                                            np.exp2(-positions.astype(np.float64)), zp, qmin, qmax)
    edges = np.linspace(collector.lo, collector.hi, len(collector.hist) + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    signal = float(np.sum(collector.hist * centers * centers))
    return Variable(name, "activation", start, positions, _relative_costs(errors, WINDOW, signal))


def tensor_variable(name: str, kind: str, values: np.ndarray, start: int) -> Variable:
    """A weight or bias quantized to int8 at one position for the whole tensor."""
    positions = _window(start)
    flat = np.asarray(values, dtype=np.float64).reshape(1, -1)
    errors = kernels.tensor_quant_errors(flat, np.exp2(-positions.astype(np.float64)), 0.0, _INT8_MIN, _INT8_MAX)[0]
    return Variable(name, kind, start, positions, _relative_costs(errors, WINDOW, float(np.sum(flat * flat))))


def best_int8_position(values: np.ndarray) -> int:
    """The position with the least squared error of int8 rounding (a bias's own position)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    abs_max = float(np.max(np.abs(flat))) if flat.size else 0.0
    if abs_max == 0:
        return 0
    no_overflow = -math.ceil(math.log2(abs_max / _INT8_MAX))
    positions = np.arange(no_overflow, no_overflow + 2 * WINDOW + 1)
    errors = kernels.tensor_quant_errors(flat.reshape(1, -1), np.exp2(-positions.astype(np.float64)), 0.0,
                                         _INT8_MIN, _INT8_MAX)[0]
    return int(positions[int(np.argmin(errors))])


def build_problem(model: ModelProto, plan: QuantPlan, table: QuantTable, collectors: Mapping[str, TensorCollector],
                  config: QuantConfig, rules: NpuRules) -> PositionProblem:
    view = GraphView(model)
    planned = set(plan.activations)
    group_of = plan.group_of()
    variables: List[Variable] = []
    groups: Dict[int, int] = {}
    group_var: Dict[int, int] = {}
    qtype = config.activation_type
    for gi, members in enumerate(plan.groups):
        merged = collectors.get(members[0])
        if merged is None:  # a constant activation: its values are its statistics
            continue
        for name in members[1:]:
            if name in collectors:
                merged = merged.merged(collectors[name])
        qp = table.activations[members[0]]
        group_qtype = max((config.tensor_types.get(m, qtype) for m in members), key=lambda t: t.bits)
        group_var[gi] = len(variables)
        groups[len(variables)] = gi
        variables.append(activation_variable(members[0], merged, qp, group_qtype.qmin, group_qtype.qmax))

    def act(name: str) -> Optional[int]:
        return group_var.get(group_of[name]) if name in group_of else None

    weights: Dict[int, WeightKey] = {}
    weight_var: Dict[WeightKey, int] = {}
    biases: Dict[int, str] = {}
    constraints: List[Constraint] = []
    bias_of = {id(b.node): b for b in plan.biases}
    uses = {id(u.node): u for u in plan.weights if u.node.op_type in ("Conv", "Gemm", "MatMul")}
    for node in model.graph.node:
        label = view.node_name(node)
        use = uses.get(id(node))
        if use is not None:
            key = weight_key(use, config.per_channel)
            entry = table.weights[key]
            if key not in weight_var:
                weight_var[key] = len(variables)
                weights[len(variables)] = key
                variables.append(tensor_variable(key[0], "weight", view.constant_value(key[0]),
                                                 position_of(float(entry.qparams.scale))))
            w = weight_var[key]
            inputs = [i for i in node.input if i in planned and i != node.input[use.input_index]]
            p_in = act(inputs[0]) if inputs else None
            out_name = fused_end(view, node.output[0], planned)
            p_out = act(out_name) if out_name else None
            if p_in is None:
                continue
            if p_out is not None:
                constraints.append(Constraint("shift_cut", label, (p_in, w, p_out), (1, 1, -1), *rules.shift_cut, fix=w))
            bias = bias_of.get(id(node))
            if bias is not None and not config.int32_bias:
                b = len(variables)
                value = view.constant_value(node.input[bias.input_index])
                variables.append(tensor_variable(node.input[bias.input_index], "bias", value,
                                                 best_int8_position(value)))
                biases[b] = node.output[0]
                constraints.append(Constraint("shift_bias", label, (p_in, w, b), (1, 1, -1), -10 ** 6,
                                              rules.shift_bias_max, fix=b))
                if p_out is not None:  # shift_bias >= shift_cut - 16  <=>  p_bias - p_out <= 16
                    constraints.append(Constraint("shift_bias_vs_cut", label, (b, p_out), (1, -1), -10 ** 6,
                                                  rules.shift_bias_cut_offset, fix=b))
            continue
        if node.op_type not in ("Add", "Mul"):
            continue
        inputs = [act(i) for i in node.input if i in planned]
        out_name = fused_end(view, node.output[0], planned)
        p_out = act(out_name) if out_name else None
        if len(inputs) != 2 or None in inputs or p_out is None:
            continue
        a, b = inputs
        if node.op_type == "Add":
            if a == b:
                continue
            # the finer input (larger position) is read with a right shift: it moves down
            finer, coarser = (a, b) if variables[a].start >= variables[b].start else (b, a)
            d = rules.add_position_difference
            constraints.append(Constraint("add_position_difference", label, (finer, coarser), (1, -1), -d, d,
                                          fix=finer))
            constraints.append(Constraint("add_shift_write", label, (a, b, p_out), (1, 1, -1),
                                          *rules.add_shift_write, fix=p_out, min_of_first_two=True))
        else:
            coefficients = (2, -1) if a == b else (1, 1, -1)
            terms = (a, p_out) if a == b else (a, b, p_out)
            constraints.append(Constraint("mul_shift", label, terms, coefficients, *rules.mul_shift, fix=p_out))
    return PositionProblem(Problem(variables, constraints), groups, weights, biases)


def apply_positions(pp: PositionProblem, positions: List[int], model: ModelProto, plan: QuantPlan,
                    table: QuantTable, config: QuantConfig) -> None:
    """Write moved positions into ``table``: a group's QParams (its zero point kept) for
    every member; a weight's scale and its nearest-rounded integers (``model`` holds the
    float weights). Bias positions are chosen when the biases are final (choose_bias_positions)."""
    view = GraphView(model)
    for v, gi in pp.groups.items():
        p = positions[v]
        if p != pp.problem.variables[v].start:
            for name in plan.groups[gi]:
                old = table.activations[name]
                table.activations[name] = QParams(np.array(2.0 ** -p, dtype=np.float32), old.zero_point, old.axis)
    for v, key in pp.weights.items():
        p = positions[v]
        if p != pp.problem.variables[v].start:
            old = table.weights[key].qparams
            qp = QParams(np.array(2.0 ** -p, dtype=np.float32), old.zero_point, old.axis)
            table.weights[key] = QuantizedWeight(qp, quantize_array(view.constant_value(key[0]), qp,
                                                                    config.weight_type))
