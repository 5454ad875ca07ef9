"""A plain numpy integer interpreter of QDQ models with power-of-two scales: the NPU's
arithmetic written out the obvious way (int64 sums, integer shifts), independent of
pyquant.npu.emulator, which the tests compare against it bit for bit.

A value between a DequantizeLinear and a QuantizeLinear is held exactly as Fix(v, p) =
v * 2^-p with integer v; each op computes on the integers; QuantizeLinear is the one
rounding (a right shift by p - p_out in the generation's mode) and the saturation.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List

import numpy as np
import onnx
from onnx import numpy_helper

from pyquant.npu.rules import NpuRules, Rounding

ACCUMULATOR_BITS = 32


@dataclasses.dataclass
class Fix:
    v: np.ndarray  # int64
    p: int

    def at(self, p: int) -> np.ndarray:
        assert p >= self.p
        return self.v << (p - self.p)


def exact_fix(value: np.ndarray) -> Fix:
    """A float constant as an exact Fix (float32 values are dyadic)."""
    value = np.asarray(value, dtype=np.float64)
    p = 0
    while not np.all(value * 2.0 ** p == np.round(value * 2.0 ** p)):
        p += 1
    return Fix(np.round(value * 2.0 ** p).astype(np.int64), p)


def shift_round(v: np.ndarray, shift: int, rounding: Rounding) -> np.ndarray:
    """v / 2^shift rounded (shift > 0), or v * 2^-shift."""
    v = v.astype(np.int64)
    if shift <= 0:
        return v << -shift
    half = np.int64(1) << (shift - 1)
    if rounding is Rounding.HALF_UP:
        return (v + half) >> shift
    if rounding is Rounding.HALF_AWAY:
        return np.sign(v) * ((np.abs(v) + half) >> shift)
    q, r = v >> shift, v & ((np.int64(1) << shift) - 1)
    return q + (r > half) + ((r == half) & (q & 1 == 1))


def conv(x: np.ndarray, w: np.ndarray, strides, pads, dilations, group: int) -> np.ndarray:
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (x.shape[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (x.shape[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    out = np.zeros((n, m, oh, ow), dtype=np.int64)
    mg = m // group
    for g in range(group):
        xs = x[:, g * cg:(g + 1) * cg]
        for a in range(kh):
            for b in range(kw):
                patch = xs[:, :, a * dilations[0]: a * dilations[0] + strides[0] * (oh - 1) + 1: strides[0],
                           b * dilations[1]: b * dilations[1] + strides[1] * (ow - 1) + 1: strides[1]]
                out[:, g * mg:(g + 1) * mg] += np.einsum("nchw,mc->nmhw", patch, w[g * mg:(g + 1) * mg, :, a, b])
    return out


def window_reduce(x: np.ndarray, kernel, strides, reduce) -> np.ndarray:
    oh = (x.shape[2] - kernel[0]) // strides[0] + 1
    ow = (x.shape[3] - kernel[1]) // strides[1] + 1
    parts = [x[:, :, a: a + strides[0] * (oh - 1) + 1: strides[0], b: b + strides[1] * (ow - 1) + 1: strides[1]]
             for a in range(kernel[0]) for b in range(kernel[1])]
    return reduce(np.stack(parts), axis=0)


def attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def position(scale: np.ndarray) -> int:
    p = -math.log2(float(scale))
    assert p == round(p), scale
    return int(round(p))


def run(model: onnx.ModelProto, feeds: Dict[str, np.ndarray], rules: NpuRules, rounding: Rounding
        ) -> Dict[str, np.ndarray]:
    """Every tensor's value: integer arrays for QuantizeLinear outputs, Fix otherwise."""
    env: Dict[str, object] = {k: numpy_helper.to_array(i) for i in model.graph.initializer for k in [i.name]}
    for name, value in feeds.items():
        env[name] = exact_fix(value)

    def fix(name: str) -> Fix:
        value = env[name]
        return value if isinstance(value, Fix) else exact_fix(value)

    for node in model.graph.node:
        op, a = node.op_type, attrs(node)
        ins = list(node.input)
        if op == "QuantizeLinear":
            x, p_out = fix(ins[0]), position(env[ins[1]])
            zp = env[ins[2]]
            info = np.iinfo(zp.dtype)
            q = shift_round(x.v, x.p - p_out, rounding) + int(zp)
            out = np.clip(q, info.min, info.max).astype(zp.dtype)
        elif op == "DequantizeLinear":
            out = Fix(env[ins[0]].astype(np.int64) - int(env[ins[2]]), position(env[ins[1]]))
        elif op in ("Conv", "Gemm", "MatMul"):
            x, w = fix(ins[0]), fix(ins[1])
            if op == "Conv":
                k = len(w.v.shape) - 2
                acc = conv(x.v, w.v, a.get("strides", [1] * k), a.get("pads", [0] * 2 * k),
                           a.get("dilations", [1] * k), a.get("group", 1))
            else:
                wv = w.v.T if a.get("transB", 0) else w.v
                acc = x.v @ wv
            p = x.p + w.p
            if len(ins) > 2 and ins[2]:
                b = fix(ins[2])
                bv = b.v.reshape([1, -1] + [1] * (acc.ndim - 2)) if op == "Conv" else b.v
                top = max(p, b.p)
                acc, p = (acc << (top - p)) + (bv << (top - b.p)), top
            limit = np.int64(1) << (ACCUMULATOR_BITS - 1 + p - x.p - w.p)
            unit = np.int64(1) << (p - x.p - w.p)
            out = Fix(np.clip(acc, -limit, limit - unit), p)
        elif op == "Relu":
            x = fix(ins[0])
            out = Fix(np.maximum(x.v, 0), x.p)
        elif op in ("Clip", "Max", "Min"):
            x = fix(ins[0])
            bounds = [exact_fix(env[i]) for i in ins[1:] if i]
            top = max([x.p] + [b.p for b in bounds])
            v = x.at(top)
            if op == "Clip":
                v = np.clip(v, bounds[0].at(top), bounds[1].at(top))
            else:
                v = (np.maximum if op == "Max" else np.minimum)(v, bounds[0].at(top))
            out = Fix(v, top)
        elif op in ("Add", "Sub"):
            x, y = fix(ins[0]), fix(ins[1])
            top = max(x.p, y.p)
            out = Fix(x.at(top) + y.at(top) if op == "Add" else x.at(top) - y.at(top), top)
        elif op == "Mul":
            x, y = fix(ins[0]), fix(ins[1])
            out = Fix(x.v * y.v, x.p + y.p)
        elif op == "Concat":
            xs = [fix(i) for i in ins]
            top = max(x.p for x in xs)
            out = Fix(np.concatenate([x.at(top) for x in xs], axis=a["axis"]), top)
        elif op == "MaxPool":
            x = fix(ins[0])
            out = Fix(window_reduce(x.v, a["kernel_shape"], a.get("strides", [1, 1]), np.max), x.p)
        elif op in ("AveragePool", "GlobalAveragePool", "ReduceMean"):
            x = fix(ins[0])
            if op == "AveragePool":
                kernel = a["kernel_shape"]
                total = window_reduce(x.v, kernel, a.get("strides", [1, 1]), np.sum)
                k, n = rules.average_factor(*kernel)
            else:
                axes = [2, 3] if op == "GlobalAveragePool" else list(a.get("axes", env[ins[1]] if len(ins) > 1 else []))
                total = x.v.sum(axis=tuple(axes), keepdims=bool(a.get("keepdims", 1)))
                sizes = [x.v.shape[i] for i in axes]
                k, n = rules.average_factor(*sizes) if len(sizes) == 2 else rules.average_factor(int(np.prod(sizes)))
            out = Fix(total * k, x.p + n)
        elif op == "LeakyRelu":
            x = fix(ins[0])
            k, bits = rules.leaky_relu_alpha(a.get("alpha", 0.01))
            out = Fix(np.where(x.v < 0, x.v * k, x.v << bits), x.p + bits)
        elif op in ("HardSigmoid", "HardSwish"):
            x = fix(ins[0])
            k, n = rules.hard_sigmoid
            three, six = np.int64(3) << x.p, np.int64(6) << x.p
            hs = Fix(np.clip(x.v + three, 0, six) * k, x.p + n)
            out = hs if op == "HardSigmoid" else Fix(x.v * hs.v, x.p + hs.p)
        elif op in ("Reshape", "Flatten", "Transpose", "Slice", "Pad", "Squeeze", "Unsqueeze", "Identity"):
            x = fix(ins[0])
            if op == "Reshape":
                v = x.v.reshape(env[ins[1]])
            elif op == "Flatten":
                axis = a.get("axis", 1)
                v = x.v.reshape(int(np.prod(x.v.shape[:axis])), -1)
            elif op == "Transpose":
                v = x.v.transpose(a["perm"])
            elif op == "Slice":
                starts, ends = env[ins[1]], env[ins[2]]
                axes = env[ins[3]] if len(ins) > 3 else range(len(starts))
                steps = env[ins[4]] if len(ins) > 4 else [1] * len(starts)
                index = [slice(None)] * x.v.ndim
                for s, e, ax, st in zip(starts, ends, axes, steps):
                    index[ax] = slice(int(s), int(e), int(st))
                v = x.v[tuple(index)]
            elif op == "Pad":
                pads = env[ins[1]]
                half = len(pads) // 2
                v = np.pad(x.v, [(int(pads[i]), int(pads[i + half])) for i in range(half)])
            elif op == "Squeeze":
                v = np.squeeze(x.v, axis=tuple(env[ins[1]]))
            elif op == "Unsqueeze":
                v = np.expand_dims(x.v, axis=tuple(env[ins[1]]))
            else:
                v = x.v
            out = Fix(v, x.p)
        else:
            raise NotImplementedError(op)
        if isinstance(out, Fix):
            assert np.all(np.abs(out.v) < 2 ** 62), f"int64 overflow risk at {op}"
        env[node.output[0]] = out
    return env


def quantized_outputs(model: onnx.ModelProto) -> List[str]:
    return [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
