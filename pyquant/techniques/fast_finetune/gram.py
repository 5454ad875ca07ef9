"""Layers as linear maps of input patches, and the Gram matrices of their output error.

A Conv with g groups maps each im2col patch of group gi (K = C_in/g * kh * kw values) to
the C_out/g outputs of that group; a Gemm/MatMul maps each input row (K features) to its
outputs. So every supported layer is a weight [groups, rows, K] applied to patches
[groups, M, K], and the squared error of its outputs over M patches (float weights against
integer weights, on the same quantized inputs x_q) depends on the data only through
E[x_q x_q^T] and the mean E[x_q] (see csrc/kernels/rounding.h). GramAccumulator sums those
over batches: its memory is O(groups * K^2) whatever the number of calibration samples.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple, Union

import numpy as np
from onnx import NodeProto

from ... import kernels
from ...graph.plan import WeightUse
from ...graph.view import GraphView, attribute


@dataclasses.dataclass
class LinearLayer:
    node: NodeProto
    name: str
    weight_name: str
    weight: np.ndarray  # [groups, rows, K] float32
    onnx_shape: Tuple[int, ...]
    transposed: bool  # the initializer is [K, rows] (Gemm transB=0, MatMul)
    bias_input: Optional[int]  # input index of the bias (Conv/Gemm), None for MatMul
    # Conv geometry (None for dense layers)
    kernel: Optional[Tuple[int, int]] = None
    strides: Tuple[int, int] = (1, 1)
    dilations: Tuple[int, int] = (1, 1)
    pads: Tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    auto_pad: str = "NOTSET"

    @property
    def is_pointwise(self) -> bool:  # a 1x1 convolution without stride or padding: no window
        return self.kernel == (1, 1) and self.strides == (1, 1) and not any(self.pads) \
            and self.auto_pad in ("NOTSET", "", "VALID")

    @property
    def groups(self) -> int:
        return self.weight.shape[0]

    @property
    def rows(self) -> int:
        return self.weight.shape[1]

    @property
    def k(self) -> int:
        return self.weight.shape[2]

    def to_onnx_layout(self, q: np.ndarray) -> np.ndarray:
        """[groups, rows, K] -> the initializer's layout."""
        if self.kernel is not None:
            return q.reshape(self.onnx_shape)
        q2 = q.reshape(self.rows, self.k)
        return np.ascontiguousarray(q2.T) if self.transposed else q2

    def row_values(self, per_output_channel: np.ndarray) -> np.ndarray:
        """A per-output-channel vector as [groups, rows]."""
        return np.asarray(per_output_channel).reshape(self.groups, self.rows)

    def patches(self, x: np.ndarray) -> np.ndarray:
        """The layer's input batch as patches [groups, M, K] (float32, C-contiguous)."""
        x = np.asarray(x, dtype=np.float32)
        if self.kernel is None:
            return np.ascontiguousarray(x.reshape(-1, self.k)[None])
        return _im2col(x, self)


def describe(view: GraphView, use: WeightUse) -> Union[LinearLayer, str]:
    """The layer of a weight use, or the reason it cannot be finetuned."""
    node = use.node
    name = view.node_name(node)
    w_name = node.input[use.input_index]
    w = view.constant_value(w_name).astype(np.float32)
    if node.op_type == "Conv":
        if w.ndim != 4:
            return f"{w.ndim - 2}-D convolution (only 2-D is finetuned)"
        g = int(attribute(node, "group", 1))
        out_c = w.shape[0]
        if out_c % g:
            return f"group {g} does not divide {out_c} output channels"
        pads = tuple(attribute(node, "pads", [0, 0, 0, 0]))
        return LinearLayer(node, name, w_name, np.ascontiguousarray(w.reshape(g, out_c // g, -1)), w.shape,
                           False, 2, kernel=(w.shape[2], w.shape[3]),
                           strides=tuple(attribute(node, "strides", [1, 1])),
                           dilations=tuple(attribute(node, "dilations", [1, 1])),
                           pads=(pads[0], pads[1], pads[2], pads[3]),
                           auto_pad=_str(attribute(node, "auto_pad", "NOTSET")))
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0:
            return "Gemm with transA, alpha or beta (not finetuned)"
        trans_b = bool(attribute(node, "transB", 0))
        w2 = w if trans_b else w.T
        return LinearLayer(node, name, w_name, np.ascontiguousarray(w2[None]), w.shape, not trans_b, 2)
    if node.op_type == "MatMul":
        if w.ndim != 2 or use.input_index != 1:
            return "MatMul whose constant weight is not a 2-D second input"
        return LinearLayer(node, name, w_name, np.ascontiguousarray(w.T[None]), w.shape, True, None)
    return f"op type {node.op_type} is not finetuned"


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _conv_pads(layer: LinearLayer, h: int, w: int) -> Tuple[int, int, int, int]:
    if layer.auto_pad in ("NOTSET", ""):
        return layer.pads
    if layer.auto_pad == "VALID":
        return (0, 0, 0, 0)
    pads = []
    for size, k, s, d in ((h, layer.kernel[0], layer.strides[0], layer.dilations[0]),
                          (w, layer.kernel[1], layer.strides[1], layer.dilations[1])):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        pads.append((small, total - small) if layer.auto_pad == "SAME_UPPER" else (total - small, small))
    return (pads[0][0], pads[1][0], pads[0][1], pads[1][1])


def _im2col(x: np.ndarray, layer: LinearLayer) -> np.ndarray:
    n, c, h, w = x.shape
    g = layer.groups
    cg = c // g
    kh, kw = layer.kernel
    (sh, sw), (dh, dw) = layer.strides, layer.dilations
    top, left, bottom, right = _conv_pads(layer, h, w)
    if kh == kw == 1 and sh == sw == 1 and not (top or left or bottom or right):
        return np.ascontiguousarray(x.reshape(n, g, cg, h * w).transpose(1, 0, 3, 2)).reshape(g, n * h * w, cg)
    if top or left or bottom or right:
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    ho = (x.shape[2] - (kh - 1) * dh - 1) // sh + 1
    wo = (x.shape[3] - (kw - 1) * dw - 1) // sw + 1
    # cols[g, n, ho, wo, cg, kh, kw]: K ordered (channel, kernel row, kernel column) as the weight
    cols = np.empty((g, n, ho, wo, cg, kh, kw), dtype=np.float32)
    xg = x.reshape(n, g, cg, x.shape[2], x.shape[3]).transpose(1, 0, 3, 4, 2)  # [g, n, H, W, cg]
    for i in range(kh):
        for j in range(kw):
            cols[..., i, j] = xg[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
    return cols.reshape(g, n * ho * wo, cg * kh * kw)


class GramAccumulator:
    """Streaming sums of x_q x_q^T and x_q per group (a layer's inputs in the quantized
    network); O(groups * K^2) memory whatever the number of samples."""

    def __init__(self, groups: int, k: int) -> None:
        self.qq = np.zeros((groups, k, k))
        self.sum_q = np.zeros((groups, k))
        self.count = 0

    def update_layer(self, layer: LinearLayer, xq: np.ndarray) -> None:
        """Add a batch of the layer's inputs."""
        if layer.kernel is not None and not layer.is_pointwise:
            xq = np.asarray(xq, np.float32)
            if xq.ndim != 4:
                raise ValueError(f"{layer.name}: inputs must be [N, C, H, W], got {xq.shape}")
            pads = _conv_pads(layer, xq.shape[2], xq.shape[3])
            self.count += kernels.window_gram(xq, None, layer.groups, layer.kernel, layer.strides, layer.dilations,
                                              pads, self.qq, _NO_FLOAT_GRAM, _NO_FLOAT_GRAM, self.sum_q,
                                              _NO_FLOAT_SUM)
        else:
            self.update(layer.patches(xq))

    def update(self, pq: np.ndarray) -> None:
        """Add a batch of patches [groups, M, K]."""
        self.qq += np.matmul(pq.transpose(0, 2, 1), pq)
        self.sum_q += pq.sum(axis=1, dtype=np.float64)
        self.count += pq.shape[1]

    def moments(self, centered: bool) -> Tuple[np.ndarray, np.ndarray]:
        """(A, mean): E[x_q x_q^T], about the mean when ``centered`` (then a bias absorbs the
        offset), and E[x_q]."""
        m = max(self.count, 1)
        mean = self.sum_q / m
        a = self.qq / m
        if centered:
            a = a - np.einsum("gi,gj->gij", mean, mean)
        return a, mean


# window_gram's float-network accumulators, unused here (no float inputs are passed).
_NO_FLOAT_GRAM = np.zeros((0, 0, 0))
_NO_FLOAT_SUM = np.zeros((0, 0))
