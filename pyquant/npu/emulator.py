"""NPU arithmetic on onnxruntime: a QDQ model with power-of-two scales rewritten so that
onnxruntime computes what the NPU computes (an evaluation target, ``pyquant eval --target
npu-sim``), bit for bit where the NPU's arithmetic is public (pyquant.npu.rules).

Every float tensor of the QDQ model becomes a float64 tensor holding the exact value the
NPU holds (q * 2^-p is exact in float64, and so are the sums and products below):

  DequantizeLinear         (q - zp) * 2^-p, exact
  Conv / Gemm / MatMul     ConvInteger / MatMulInteger on the int8 data: the int32
                           accumulator, exact; times 2^-(p_in + p_w) plus the bias (int8 at
                           its own position or int32), saturated to the accumulator width;
                           the fused activation (Relu/Clip) then acts on the unrounded value
  Add, Mul, Concat, data   on the exact values (the NPU's aligned integer sum / product)
  movement, MaxPool
  AveragePool,             window sum (exact) times k / 2^n (rules.average_factor)
  GlobalAveragePool,
  ReduceMean
  LeakyRelu                alpha -> round(256 alpha) / 256
  HardSigmoid, HardSwish   relu6(x + 3) * 2731 / 2^14 (x * that for HardSwish)
  QuantizeLinear           x * 2^p, rounded by the generation's mode (half-up: floor(x + 0.5);
                           half-even; half-away), saturated, zero point added: the one
                           rounding of the NPU's shift

An approximation the graph already carries is not applied twice: alpha = k/256, a
HardSigmoid of slope 2731/2^14 and a Mul by a dyadic constant are already what the NPU
computes, and the rewrite maps them to themselves. Ops without a public integer form
(Sigmoid, Tanh, Softmax, ...) run in float between the exact input and the NPU-rounded
output; Emulation.float_nodes lists them with the reason, never silently.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from ..errors import ModelError
from ..graph.view import attribute, node_name
from .rules import NpuRules, Rounding, generation as generation_rules

F64 = TensorProto.DOUBLE
# Ops onnxruntime runs on float64 whose float inputs are all the data type T
# (op -> indices of T inputs; None: every input).
_DOUBLE_OPS: Dict[str, Optional[Tuple[int, ...]]] = {
    "Relu": None, "Clip": None, "Add": None, "Sub": None, "Mul": None, "Max": None, "Min": None, "Neg": None,
    "Abs": None, "Concat": None, "MaxPool": (0,), "Reshape": (0,), "Flatten": (0,), "Transpose": (0,),
    "Squeeze": (0,), "Unsqueeze": (0,), "Slice": (0,), "Pad": (0, 2), "Identity": (0,), "Split": (0,),
    "Gather": (0,), "Expand": (0,), "Tile": (0,), "DepthToSpace": (0,), "SpaceToDepth": (0,),
}
_NO_INTEGER_FORM = "no public integer form (the NPU uses a lookup table): computed in float, rounded by the NPU"
_NOT_POW2 = "scale is not a single power of two: computed as onnxruntime does"


@dataclasses.dataclass(frozen=True)
class Emulation:
    """The rewritten model and what it could not compute in NPU arithmetic."""

    model: ModelProto
    rules: NpuRules
    rounding: Rounding
    float_nodes: Dict[str, str]  # node -> why it runs in float
    observed: Dict[str, str] = dataclasses.field(default_factory=dict)  # tensor -> its float32 copy in the model

    def describe(self) -> str:
        head = f"npu-sim ({self.rules.name}, rounding {self.rounding.value})"
        if not self.float_nodes:
            return head + ": every node in NPU integer arithmetic"
        kinds: Dict[str, List[str]] = {}
        for node, why in self.float_nodes.items():
            kinds.setdefault(why, []).append(node)
        parts = [f"{len(v)} node(s) {why}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}" for why, v in kinds.items()]
        return head + "; " + "; ".join(parts)


def _position(scale: np.ndarray) -> Optional[int]:
    if scale.size != 1:
        return None
    e = -math.log2(float(scale.ravel()[0])) if float(scale.ravel()[0]) > 0 else math.nan
    return int(round(e)) if math.isfinite(e) and e == round(e) else None


class _Rewriter:
    def __init__(self, model: ModelProto, rules: NpuRules, rounding: Rounding) -> None:
        self.model = onnx.shape_inference.infer_shapes(model)
        self.rules, self.rounding = rules, rounding
        g = self.model.graph
        self.inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.types: Dict[str, int] = {i.name: i.data_type for i in g.initializer}
        self.shapes: Dict[str, List[Optional[int]]] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            t = vi.type.tensor_type
            self.types[vi.name] = t.elem_type
            if t.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        self.producer = {o: n for n in g.node for o in n.output}
        self.graph_inputs = {i.name for i in g.input if i.name not in self.inits}
        self.graph_outputs = {o.name for o in g.output}
        self.nodes: List[NodeProto] = []
        self.new_inits: Dict[str, np.ndarray] = {}
        self.float_nodes: Dict[str, str] = {}
        self.observed: Dict[str, str] = {}
        self.count = 0

    # ---- names and constants --------------------------------------------------------------

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}__npu{self.count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(hint)
        self.new_inits[name] = np.asarray(array)
        return name

    def is_float(self, name: str) -> bool:
        return bool(name) and self.types.get(name) == TensorProto.FLOAT

    def f64(self, name: str) -> str:
        """The float64 twin of a float tensor (graph inputs are cast, constants converted)."""
        if name in self.inits:
            return self.const(name, self.inits[name].astype(np.float64))
        return name + "__npu64" if name in self.graph_inputs or name in self.graph_outputs else name

    def out64(self, name: str) -> str:
        return name + "__npu64" if name in self.graph_outputs else name

    def emit(self, op: str, inputs: Sequence[str], outputs: Sequence[str], **attrs) -> None:
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), **attrs))

    def tmp(self, op: str, inputs: Sequence[str], hint: str, **attrs) -> str:
        out = self.fresh(hint)
        self.emit(op, inputs, [out], **attrs)
        return out

    # ---- QDQ --------------------------------------------------------------------------------

    def dq_parts(self, name: str) -> Optional[Tuple[str, int, int]]:
        """(quantized tensor, position, zero point) of a per-tensor power-of-two DequantizeLinear output."""
        node = self.producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 2:
            return None
        scale = self.inits.get(node.input[1])
        zp = self.inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1, np.uint8)
        if scale is None or zp is None or zp.size != 1:
            return None
        p = _position(scale)
        return None if p is None else (node.input[0], p, int(zp.ravel()[0]))

    def dequantize(self, node: NodeProto) -> None:
        parts = self.dq_parts(node.output[0])
        if parts is None:
            self.in_float(node, _NOT_POW2)
            return
        q, p, zp = parts
        x = self.tmp("Cast", [q], "dq", to=F64)
        if zp:
            x = self.tmp("Sub", [x, self.const("zp", np.array(zp, np.float64))], "dq")
        self.emit("Mul", [x, self.const("scale", np.array(2.0 ** -p))], [self.out64(node.output[0])])

    def quantize(self, node: NodeProto) -> None:
        scale = self.inits.get(node.input[1])
        zp_array = self.inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        p = _position(scale) if scale is not None else None
        if p is None or zp_array is None or zp_array.size != 1:
            self.in_float(node, _NOT_POW2)
            return
        zp = int(zp_array.ravel()[0])
        info = np.iinfo(zp_array.dtype)
        t = self.tmp("Mul", [self.f64(node.input[0]), self.const("inv_scale", np.array(2.0 ** p))], "q")
        r = self.round(t, zp)  # zp added
        r = self.tmp("Clip", [r, self.const("lo", np.array(info.min, np.float64)),
                              self.const("hi", np.array(info.max, np.float64))], "q")
        self.emit("Cast", [r], [node.output[0]], to=helper.np_dtype_to_tensor_dtype(zp_array.dtype))

    def round(self, t: str, zp: int) -> str:
        """round(t) + zp in the generation's mode; zp (an integer) joins the rounding where
        that is exact: floor(t + 0.5) + zp = floor(t + 0.5 + zp), and half-even with an even zp."""
        if self.rounding is Rounding.HALF_UP:
            return self.tmp("Floor", [self.tmp("Add", [t, self.const("half", np.array(0.5 + zp))], "r")], "r")
        if self.rounding is Rounding.HALF_EVEN and zp % 2 == 0:
            shifted = self.tmp("Add", [t, self.const("zp", np.array(float(zp)))], "r") if zp else t
            return self.tmp("Round", [shifted], "r")
        if self.rounding is Rounding.HALF_EVEN:
            r = self.tmp("Round", [t], "r")
        else:
            half = self.const("half", np.array(0.5))
            magnitude = self.tmp("Floor", [self.tmp("Add", [self.tmp("Abs", [t], "r"), half], "r")], "r")
            r = self.tmp("Mul", [self.tmp("Sign", [t], "r"), magnitude], "r")
        return self.tmp("Add", [r, self.const("zp", np.array(float(zp)))], "r") if zp else r

    # ---- layers -------------------------------------------------------------------------------

    def weight(self, name: str) -> Optional[Tuple[np.ndarray, int]]:
        """(int8 values, position) of a weight DequantizeLinear with zero point 0."""
        parts = self.dq_parts(name)
        if parts is None or parts[0] not in self.inits or parts[2] != 0:
            return None
        return self.inits[parts[0]], parts[1]

    def bias_value(self, name: str) -> Optional[np.ndarray]:
        """A bias's exact value (its integers times its power-of-two scale), float64."""
        parts = self.dq_parts(name)
        if parts is None or parts[0] not in self.inits:
            return self.inits[name].astype(np.float64) if name in self.inits else None
        return (self.inits[parts[0]].astype(np.float64) - parts[2]) * 2.0 ** -parts[1]

    def layer(self, node: NodeProto) -> bool:
        """Conv/Gemm/MatMul in integers; False if the node is not a quantized layer."""
        x = self.dq_parts(node.input[0]) if node.input else None
        w = self.weight(node.input[1]) if len(node.input) > 1 else None
        if x is None or w is None or x[0] in self.inits:
            return False
        (q, p_in, zp), (wq, p_w) = x, w
        if node.op_type == "Conv":
            acc = self.conv_sum(node, q, zp, wq)
            if acc is None:
                return False
        else:
            zp_name = self.const("x_zp", np.array(zp, dtype=self.inits_dtype(q)))
            if node.op_type == "Gemm":
                if (attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0
                        or attribute(node, "beta", 1.0) != 1.0):
                    return False
                wq = np.ascontiguousarray(wq.T) if attribute(node, "transB", 0) else wq
            acc = self.tmp("Cast", [self.tmp("MatMulInteger", [q, self.const("w", wq), zp_name], "acc")], "acc", to=F64)
        value = self.tmp("Mul", [acc, self.const("acc_scale", np.array(2.0 ** -(p_in + p_w)))], "acc")
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = self.bias_value(node.input[2])
            if bias is None:
                return False
            if node.op_type == "Conv":
                bias = bias.reshape([1, -1] + [1] * (len(wq.shape) - 2))
            value = self.tmp("Add", [value, self.const("bias", bias)], "acc")
        limit = 2.0 ** (self.rules.accumulator_bits - 1) * 2.0 ** -(p_in + p_w)
        terms = int(np.prod(wq.shape[1:]))
        bound = terms * self.largest_input(q, zp) * float(np.max(np.abs(wq.astype(np.int64)), initial=0)) \
            * 2.0 ** -(p_in + p_w) + float(np.max(np.abs(bias), initial=0) if bias is not None else 0)
        if bound < limit:  # the accumulator cannot saturate: no clip to compute
            self.emit("Identity", [value], [self.out64(node.output[0])])
        else:
            self.emit("Clip", [value, self.const("acc_lo", np.array(-limit)),
                               self.const("acc_hi", np.array(limit - 2.0 ** -(p_in + p_w)))],
                      [self.out64(node.output[0])])
        return True

    def largest_input(self, q: str, zp: int) -> int:
        info = np.iinfo(self.inits_dtype(q))
        return max(zp - int(info.min), int(info.max) - zp)

    def conv_sum(self, node: NodeProto, q: str, zp: int, wq: np.ndarray) -> Optional[str]:
        """The exact integer accumulator of a Conv, float64. As float32 Convs on the integer
        values when every partial sum stays below 2^24 (then float32 sums are exact),
        split over input channels if needed; ConvInteger otherwise (exact, slower)."""
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        group = int(attrs.get("group", 1))
        window = int(np.prod(wq.shape[2:]))
        largest = self.largest_input(q, zp) * max(1, int(np.max(np.abs(wq.astype(np.int64)), initial=0)))
        per_chunk = (2 ** 24 // largest) // window  # input channels whose sum is exact in float32
        if per_chunk < 1 or (group > 1 and wq.shape[1] > per_chunk):
            zp_name = self.const("x_zp", np.array(zp, dtype=self.inits_dtype(q)))
            acc = self.tmp("ConvInteger", [q, self.const("w", wq), zp_name], "acc", **attrs)
            return self.tmp("Cast", [acc], "acc", to=F64)
        x = self.tmp("Cast", [q], "x", to=TensorProto.FLOAT)
        if zp:
            x = self.tmp("Sub", [x, self.const("x_zp", np.array(zp, np.float32))], "x")
        sums = []
        for start in range(0, wq.shape[1], per_chunk):
            stop = min(start + per_chunk, wq.shape[1])
            part = x
            if stop - start < wq.shape[1]:
                part = self.tmp("Slice", [x, self.const("s", np.array([start], np.int64)),
                                          self.const("e", np.array([stop], np.int64)),
                                          self.const("a", np.array([1], np.int64))], "x")
            summed = self.tmp("Conv", [part, self.const("w", wq[:, start:stop].astype(np.float32))], "acc", **attrs)
            sums.append(self.tmp("Cast", [summed], "acc", to=F64))
        total = sums[0]
        for other in sums[1:]:
            total = self.tmp("Add", [total, other], "acc")
        return total

    def inits_dtype(self, q: str) -> type:
        elem = self.types.get(q)
        return np.int8 if elem == TensorProto.INT8 else np.uint8

    def spatial(self, name: str) -> Optional[List[Optional[int]]]:
        """The shape with every dimension after the batch known, else None."""
        shape = self.shapes.get(name)
        return shape if shape is not None and all(d is not None for d in shape[1:]) else None

    def average(self, node: NodeProto) -> bool:
        """Window sum (exact) times k / 2^n."""
        x = self.f64(node.input[0])
        shape = self.spatial(node.input[0])
        if node.op_type == "GlobalAveragePool":
            if shape is None or len(shape) != 4:
                return False
            total = self.tmp("ReduceSum", [x, self.const("axes", np.array([2, 3], np.int64))], "pool", keepdims=1)
            k, n = self.rules.average_factor(shape[2], shape[3])
        elif node.op_type == "ReduceMean":
            axes = attribute(node, "axes", None)
            if axes is None and len(node.input) > 1 and node.input[1] in self.inits:
                axes = self.inits[node.input[1]].tolist()
            if shape is None or axes is None:
                return False
            axes = [a % len(shape) for a in axes]
            sizes = [shape[a] for a in axes]
            total = self.tmp("ReduceSum", [x, self.const("axes", np.array(axes, np.int64))], "mean",
                             keepdims=attribute(node, "keepdims", 1))
            k, n = self.rules.average_factor(*sizes) if len(sizes) == 2 else self.rules.average_factor(
                int(np.prod(sizes)))
        else:  # AveragePool: the window sum as a float32 depthwise Conv of ones (exact: few 8-bit terms)
            kernel = list(attribute(node, "kernel_shape"))
            pads = list(attribute(node, "pads", [0] * 2 * len(kernel)))
            if (shape is None or len(kernel) != 2 or attribute(node, "ceil_mode", 0)
                    or (any(pads) and not attribute(node, "count_include_pad", 0))
                    or attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
                return False
            channels = shape[1]
            x32 = self.tmp("Cast", [x], "pool", to=TensorProto.FLOAT)
            ones = self.const("ones", np.ones([channels, 1] + kernel, np.float32))
            summed = self.tmp("Conv", [x32, ones], "pool", group=channels, kernel_shape=kernel, pads=pads,
                              strides=list(attribute(node, "strides", [1, 1])))
            total = self.tmp("Cast", [summed], "pool", to=F64)
            k, n = self.rules.average_factor(*kernel)
        self.emit("Mul", [total, self.const("avg_factor", np.array(k / 2.0 ** n))], [self.out64(node.output[0])])
        return True

    def hard_sigmoid(self, x: str) -> str:
        k, n = self.rules.hard_sigmoid
        shifted = self.tmp("Add", [x, self.const("three", np.array(3.0))], "hsig")
        relu6 = self.tmp("Clip", [shifted, self.const("zero", np.array(0.0)), self.const("six", np.array(6.0))], "hsig")
        return self.tmp("Mul", [relu6, self.const("hsig_factor", np.array(k / 2.0 ** n))], "hsig")

    def activation(self, node: NodeProto) -> bool:
        x = self.f64(node.input[0])
        out = self.out64(node.output[0])
        if node.op_type == "LeakyRelu":
            k, bits = self.rules.leaky_relu_alpha(attribute(node, "alpha", 0.01))
            self.emit("LeakyRelu", [x], [out], alpha=k / 2.0 ** bits)
            return True
        if node.op_type == "HardSigmoid":
            alpha, beta = attribute(node, "alpha", 0.2), attribute(node, "beta", 0.5)
            k, n = self.rules.hard_sigmoid
            if beta != 0.5 or not (abs(alpha - 1 / 6) < 1e-6 or alpha == np.float32(k / 2.0 ** n)):
                return False
            self.emit("Identity", [self.hard_sigmoid(x)], [out])
            return True
        self.emit("Mul", [x, self.hard_sigmoid(x)], [out])  # HardSwish
        return True

    # ---- everything else ------------------------------------------------------------------

    def in_double(self, node: NodeProto, t_inputs: Optional[Tuple[int, ...]]) -> None:
        inputs = []
        for i, name in enumerate(node.input):
            is_t = t_inputs is None or i in t_inputs
            inputs.append(self.f64(name) if is_t and self.is_float(name) else name)
        outputs = [self.out64(o) if self.is_float(o) else o for o in node.output]
        copy = helper.make_node(node.op_type, inputs, outputs, name=node.name, domain=node.domain)
        copy.attribute.extend(node.attribute)
        self.nodes.append(copy)

    def in_float(self, node: NodeProto, why: str) -> None:
        """The node as in the QDQ model, its float inputs cast down and outputs cast up."""
        self.float_nodes[node_name(node)] = why
        inputs = [self.tmp("Cast", [self.f64(n)], "f32", to=TensorProto.FLOAT)
                  if self.is_float(n) and n not in self.inits else n for n in node.input]
        outputs = []
        for o in node.output:
            if self.is_float(o):
                outputs.append(self.fresh(o))
                self.emit("Cast", [outputs[-1]], [self.out64(o)], to=F64)
            else:
                outputs.append(o)
        copy = helper.make_node(node.op_type, inputs, outputs, name=node.name, domain=node.domain)
        copy.attribute.extend(node.attribute)
        self.nodes.insert(len(self.nodes) - sum(self.is_float(o) for o in node.output), copy)

    def rewrite(self, observe: Sequence[str] = ()) -> ModelProto:
        for name in self.graph_inputs:
            if self.is_float(name):
                self.emit("Cast", [name], [name + "__npu64"], to=F64)
        for node in self.model.graph.node:
            op = node.op_type
            if op == "DequantizeLinear":
                self.dequantize(node)
            elif op == "QuantizeLinear":
                self.quantize(node)
            elif op in ("Conv", "Gemm", "MatMul") and self.layer(node):
                pass
            elif op in ("GlobalAveragePool", "AveragePool", "ReduceMean") and self.average(node):
                pass
            elif op in ("LeakyRelu", "HardSigmoid", "HardSwish") and self.activation(node):
                pass
            elif op in _DOUBLE_OPS:
                self.in_double(node, _DOUBLE_OPS[op])
            else:
                known = op in ("Conv", "Gemm", "MatMul", "GlobalAveragePool", "AveragePool", "ReduceMean",
                               "HardSigmoid")
                self.in_float(node, "not a quantized layer of this form: computed in float" if known
                              else _NO_INTEGER_FORM)
        for name in self.graph_outputs:
            if self.is_float(name):
                self.emit("Cast", [name + "__npu64"], [name], to=TensorProto.FLOAT)
        for name in observe:
            if self.is_float(name) and name not in self.graph_outputs:
                self.observed[name] = name + "__npu_observed"
                self.emit("Cast", [self.f64(name)], [self.observed[name]], to=TensorProto.FLOAT)
            elif name in self.graph_outputs:
                self.observed[name] = name
        g = self.model.graph
        inits = [numpy_helper.from_array(v, k) for k, v in self.new_inits.items()]
        inits += [i for i in g.initializer]
        graph = helper.make_graph(_live(self.nodes, self.graph_outputs | set(self.observed.values())),
                                  g.name + "_npu_sim", list(g.input), list(g.output), inits)
        model = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        model.ir_version = self.model.ir_version
        return model


def _live(nodes: List[NodeProto], outputs: set) -> List[NodeProto]:
    """``nodes`` without those whose outputs nothing reads (a weight's float dequantization
    after its layer went to ConvInteger)."""
    needed = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    return keep[::-1]


def emulate(model: ModelProto, generation: str = "phoenix", rounding: Optional[Rounding] = None,
            observe: Sequence[str] = ()) -> Emulation:
    """``model`` (a QDQ model with power-of-two scales) rewritten to compute in the NPU
    arithmetic of ``generation`` (pyquant.npu.rules.GENERATIONS); ``rounding`` overrides
    the generation's rounding mode. ``observe``: float tensors of ``model`` to keep as
    float32 tensors of the result (Emulation.observed names them), e.g. for a per-layer
    comparison."""
    rules = generation_rules(generation)
    mode = rounding or rules.rounding
    if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        raise ModelError("npu-sim needs a quantized (QDQ) model: this one has no QuantizeLinear")
    rewriter = _Rewriter(model, rules, mode)
    out = rewriter.rewrite(observe)
    unused = {i.name for i in out.graph.initializer} - {i for n in out.graph.node for i in n.input}
    kept = [i for i in out.graph.initializer if i.name not in unused]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return Emulation(out, rules, mode, rewriter.float_nodes, rewriter.observed)
