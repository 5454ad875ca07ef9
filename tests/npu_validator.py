"""An independent check of an exported QDQ model against an NPU rule table
(pyquant.npu.rules.NpuRules, data only): it reads the positions from the model's
QuantizeLinear/DequantizeLinear scales and shares no code with the solver.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import onnx
from onnx import numpy_helper

from pyquant.npu.rules import NpuRules

SAME_POSITION = ("MaxPool", "AveragePool", "GlobalAveragePool", "Reshape", "Flatten", "Transpose", "Slice", "Pad",
                 "Squeeze", "Unsqueeze")
FUSED = ("Relu", "Clip", "Min", "Max")


def violations(model: onnx.ModelProto, rules: NpuRules) -> List[str]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: Dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found: List[str] = []

    def pos(scale_name: str) -> Optional[int]:
        s = inits[scale_name]
        if s.size != 1:
            found.append(f"{scale_name}: per-axis scale")
            return None
        p = -math.log2(float(s))
        if p != round(p):
            found.append(f"{scale_name}: scale {float(s)} is not a power of two")
            return None
        return int(p)

    def dq_pos(tensor: str) -> Optional[int]:
        n = producer.get(tensor)
        return pos(n.input[1]) if n is not None and n.op_type == "DequantizeLinear" else None

    def out_pos(tensor: str) -> Optional[int]:
        """Position of the QuantizeLinear the tensor reaches, through fused activations."""
        while True:
            readers = consumers.get(tensor, [])
            if len(readers) != 1:
                return None
            if readers[0].op_type == "QuantizeLinear":
                return pos(readers[0].input[1])
            if readers[0].op_type not in FUSED:
                return None
            tensor = readers[0].output[0]

    def check(name: str, rule: str, value: int, lo: int, hi: int) -> None:
        if not lo <= value <= hi:
            found.append(f"{name}: {rule} = {value} outside [{lo}, {hi}]")

    for node in model.graph.node:
        name = node.name or node.output[0]
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            pos(node.input[1])
            continue
        ins = [dq_pos(i) for i in node.input]
        out = out_pos(node.output[0])
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(ins) > 1 and None not in ins[:2]:
            p_in, p_w = ins[0], ins[1]
            cut = None if out is None else p_in + p_w - out
            if cut is not None:
                check(name, "shift_cut", cut, *rules.shift_cut)
            if len(ins) > 2 and ins[2] is not None:
                bias_dq = producer[node.input[2]]
                bits = inits[bias_dq.input[0]].dtype.itemsize * 8
                shift_bias = p_in + p_w - ins[2]
                if bits == 32:
                    check(name, "int32 bias shift", shift_bias, 0, 0)
                else:
                    lo = min(0, cut - rules.shift_bias_cut_offset) if cut is not None else -rules.shift_bias_cut_offset
                    check(name, "shift_bias", shift_bias, lo, rules.shift_bias_max)
        elif node.op_type == "Add" and len(ins) == 2 and None not in ins:
            d = rules.add_position_difference
            check(name, "Add position difference", ins[0] - ins[1], -d, d)
            if out is not None:
                check(name, "Add shift_write", min(ins) - out, *rules.add_shift_write)
        elif node.op_type == "Mul" and len(ins) == 2 and None not in ins and out is not None:
            check(name, "Mul shift", ins[0] + ins[1] - out, *rules.mul_shift)
        elif node.op_type == "Concat" and None not in ins and out is not None:
            if any(p != out for p in ins):
                found.append(f"{name}: Concat positions {ins} -> {out} differ")
        elif node.op_type in SAME_POSITION and ins and ins[0] is not None and out is not None and ins[0] != out:
            found.append(f"{name}: {node.op_type} position {ins[0]} -> {out} differ")
    return found
