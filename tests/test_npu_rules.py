"""NPU rules: each rule with a graph that violates it, the joint solver against the
node-at-a-time repair, and the independent validator (tests/npu_validator.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import npu_validator
import pyquant
from pyquant.api import quantize_detailed
from pyquant.config import get_preset
from pyquant.errors import ConfigError
from pyquant.graph.qdq import tensor_notes
from pyquant.npu import solver
from pyquant.npu.rules import PHOENIX
from pyquant.techniques import npu_positions

XINT8_INT8_BIAS = dataclasses.replace(get_preset("XINT8"), int32_bias=False)


def rules_graph() -> onnx.ModelProto:
    """Conv (3x3) -> Relu and Conv (1x1) from one input, their product (Mul of two
    activations), the product plus the second (Add of two activations), a last Conv."""
    rng = np.random.default_rng(0)
    init = []

    def const(name, array):
        init.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    nodes = [
        helper.make_node("Conv", ["x", const("wa", rng.standard_normal((4, 3, 3, 3)) * 0.3),
                                  const("ba", rng.standard_normal(4))], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["x", const("wb", rng.standard_normal((4, 3, 1, 1)) * 3),
                                  const("bb", rng.standard_normal(4) * 0.01)], ["b"]),
        helper.make_node("Mul", ["ra", "b"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["s"]),
        helper.make_node("Conv", ["s", const("wc", rng.standard_normal((2, 4, 1, 1)) * 0.05),
                                  const("bc", rng.standard_normal(2) * 5)], ["y"]),
    ]
    graph = helper.make_graph(nodes, "rules", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 8])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


DATA = np.random.default_rng(42).uniform(-1, 1, (32, 3, 8, 8)).astype(np.float32)

# (rule table field, a stricter value the graph's calibration-optimal positions break,
#  the rule's name in the solver's report, the validator's name for it)
STRICTER = [
    ("shift_cut", (0, 7), "shift_cut", "shift_cut"),
    ("shift_bias_max", 6, "shift_bias", "shift_bias"),
    ("shift_bias_cut_offset", 3, "shift_bias_vs_cut", "shift_bias"),
    ("add_position_difference", 0, "add_position_difference", "Add position difference"),
    ("add_shift_write", (-1, 0), "add_shift_write", "Add shift_write"),
    ("mul_shift", (0, 4), "mul_shift", "Mul shift"),
]


@pytest.mark.parametrize("field,value,rule,validator_name", STRICTER, ids=[s[0] for s in STRICTER])
def test_each_rule_is_kept_on_a_graph_that_breaks_it(monkeypatch, field, value, rule, validator_name):
    strict = dataclasses.replace(PHOENIX, **{field: value})
    unconstrained = pyquant.quantize(rules_graph(), DATA, XINT8_INT8_BIAS)
    assert any(validator_name in v for v in npu_validator.violations(unconstrained, strict))
    assert npu_validator.violations(unconstrained, PHOENIX) == []
    monkeypatch.setattr(npu_positions, "RULES", strict)
    result = quantize_detailed(rules_graph(), DATA, XINT8_INT8_BIAS)
    report = result.reports["npu_positions"]
    assert report.violations_at_calibration >= 1 and report.joint_violations == 0
    assert report.joint_loss <= report.node_at_a_time_loss
    moved = report.moves + report.bias_moves
    assert moved and any(rule in reason for m in moved for reason in m.reasons)
    assert npu_validator.violations(result.model, strict) == []
    notes = tensor_notes(result.model)  # the moves travel with the model, for the per-layer report
    assert any(rule in text for m in report.moves for text in notes.get(m.name, []))


def test_validator_flags_a_hand_broken_model(tiny_model, tiny_data):
    q = pyquant.quantize(tiny_model, tiny_data, "XINT8")
    assert npu_validator.violations(q, PHOENIX) == []
    broken = onnx.ModelProto()
    broken.CopyFrom(q)
    concat = next(n for n in broken.graph.node if n.op_type == "Concat")
    dq = next(n for n in broken.graph.node if n.output[0] == concat.input[0])
    scale = next(i for i in broken.graph.initializer if i.name == dq.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 2, scale.name))  # one input one step coarser
    found = npu_validator.violations(broken, PHOENIX)
    assert any("Concat" in v for v in found), found
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 0.75, scale.name))
    assert any("not a power of two" in v for v in npu_validator.violations(broken, PHOENIX))


def random_problem(rng: np.random.Generator) -> solver.Problem:
    """A chain of layers (activation, weight, activation, ...) with random MSE curves and
    a tight shift_cut, plus Add-like differences between random activations."""
    variables, constraints = [], []

    def variable(kind):
        start = int(rng.integers(-3, 10))
        costs = np.cumsum(rng.uniform(0, 1, 2 * solver.WINDOW + 1))
        costs = np.abs(costs - costs[solver.WINDOW]) * rng.uniform(0.1, 10)
        variables.append(solver.Variable(f"{kind}{len(variables)}", kind, start,
                                         np.arange(start - solver.WINDOW, start + solver.WINDOW + 1), costs))
        return len(variables) - 1

    acts = [variable("activation")]
    for i in range(6):
        w, out = variable("weight"), variable("activation")
        constraints.append(solver.Constraint("shift_cut", f"layer{i}", (acts[-1], w, out), (1, 1, -1), 0, 4, fix=w))
        acts.append(out)
    for i in range(2):
        a, b = rng.choice(len(acts), 2, replace=False)
        constraints.append(solver.Constraint("add_position_difference", f"add{i}", (acts[a], acts[b]), (1, -1), -1, 1,
                                             fix=acts[a]))
    return solver.Problem(variables, constraints)


def test_joint_solution_is_legal_and_never_loses_more_than_node_at_a_time():
    rng = np.random.default_rng(0)
    strictly_better = 0
    for _ in range(20):
        problem = random_problem(rng)
        baseline = solver.node_at_a_time(problem)
        joint = solver.joint(problem)
        if baseline.violations:
            continue
        assert joint.violations == []
        assert joint.loss <= baseline.loss + 1e-12
        strictly_better += joint.loss < baseline.loss - 1e-9
        moved = {m.name for m in solver.moves(problem, joint.positions)}
        assert moved == {v.name for v, p in zip(problem.variables, joint.positions) if p != v.start}
    assert strictly_better >= 5  # the joint choice does find what one node cannot see


def test_the_joint_solver_moves_the_cheapest_position_not_the_designated_one():
    """shift_cut = 17 > 16: the node-at-a-time repair moves the weight one step coarser
    (costly here); jointly, the output one step finer (cheap) is found instead."""
    def var(name, kind, start, slope_down, slope_up):
        offsets = np.arange(-solver.WINDOW, solver.WINDOW + 1)
        costs = np.where(offsets < 0, -offsets * slope_down, offsets * slope_up).astype(float)
        return solver.Variable(name, kind, start, start + offsets, costs)
    problem = solver.Problem(
        [var("in", "activation", 10, 1.0, 1.0), var("w", "weight", 8, 5.0, 5.0), var("out", "activation", 1, 1.0, 0.1)],
        [solver.Constraint("shift_cut", "conv", (0, 1, 2), (1, 1, -1), 0, 16, fix=1)])
    baseline, joint = solver.node_at_a_time(problem), solver.joint(problem)
    assert baseline.positions == [10, 7, 1] and baseline.loss == 5.0
    assert joint.positions == [10, 8, 2] and joint.loss == pytest.approx(0.1)
    (move,) = solver.moves(problem, joint.positions)
    assert move.name == "out" and "shift_cut = 17" in move.reasons[0]


def test_int8_bias_needs_power_of_two_scales():
    with pytest.raises(ConfigError, match="int32_bias"):
        dataclasses.replace(get_preset("U8S8"), int32_bias=False)


def test_int8_biases_are_written_as_int8_with_their_own_scale(tiny_model, tiny_data):
    q = pyquant.quantize(tiny_model, tiny_data, XINT8_INT8_BIAS)
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    bias_dq = next(n for n in q.graph.node if n.output[0] == conv.input[2])
    assert inits[bias_dq.input[0]].dtype == np.int8
    assert npu_validator.violations(q, PHOENIX) == []
