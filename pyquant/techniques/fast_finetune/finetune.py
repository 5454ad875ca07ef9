"""Fast finetune over the calibration data.

Write the quantized model (nearest rounding, corrected biases), run it over the
calibration data once with every finetuned layer's input as an output, stream those into
one GramAccumulator per layer, then fit each layer's integer weights in C++
(pyquant.kernels.fit_rounding) and its bias in closed form. One batch of activations is
alive at a time.

Objective: each layer's output with float weights, W x_q, reproduced by W~ x_q, on the
inputs x_q the quantized network really produces (AdaRound's layer-wise loss). The
target is the output before the activation function: the squared error of a linear map
is a quadratic form of the weights, which makes the Gram form (cost independent of the
calibration set size) exact; the price is that errors a following ReLU/ReLU6 would clip
away still count. Measured and rejected (README): the float network's inputs as the
target, W x_f (every layer compensates the same upstream error: 2.8 % top-1 on
EfficientNet-Lite0); the layer's own unquantized input W x_u (KL to float 0.0061 ->
0.0060 on INT8_CLE + fast finetune, 0.0051 -> 0.0054 on INT8_CNN_ACCURATE); several
passes over the data, closer to strictly sequential fitting (KL 0.0206 -> 0.0199 on
XINT8 + fast finetune, unchanged on the CLE presets, for about 25 s more).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import numpy as np
from onnx import ModelProto

from ... import kernels, threads
from ...config import FastFinetuneOptions, FinetuneAlgorithm, QuantConfig
from ...errors import DataError
from ...graph.plan import QuantPlan
from ...graph.qdq import dequantized_name, with_requantized_layer_outputs, write_qdq
from ...graph.view import GraphView, truncated
from ...qparams import QuantizedWeight, QuantTable, weight_key
from ...runtime import BoundRunner, batch_count, batch_samples, make_session, prefetch
from ..base import Callbacks, QuantState, Stage, Technique
from .gram import GramAccumulator, LinearLayer, describe

log = logging.getLogger(__name__)

_ALGORITHM = {FinetuneAlgorithm.AdaRound: kernels.RoundingAlgorithm.AdaRound,
              FinetuneAlgorithm.AdaQuant: kernels.RoundingAlgorithm.AdaQuant}


@dataclasses.dataclass(frozen=True)
class LayerResult:
    name: str
    error_before: float  # output MSE / output variance with nearest rounding (bias corrected)
    error_after: float  # the same after fast finetune
    changed: int  # weights whose integer differs from nearest rounding
    weights: int
    seconds: float


@dataclasses.dataclass
class FinetuneReport:
    layers: List[LayerResult]
    skipped: Dict[str, str]  # layer -> why it was not finetuned
    samples: int
    seconds_inference: float = 0.0
    seconds_gram: float = 0.0
    seconds_fit: float = 0.0

    def summary(self) -> str:
        if not self.layers:
            return "fast finetune: no layer finetuned"
        before = np.mean([r.error_before for r in self.layers])
        after = np.mean([r.error_after for r in self.layers])
        changed = sum(r.changed for r in self.layers) / max(sum(r.weights for r in self.layers), 1)
        return (f"fast finetune: {len(self.layers)} layers over {self.samples} samples; "
                f"mean relative output error {before:.4g} -> {after:.4g}; {100 * changed:.1f}% of weights "
                f"rounded the other way; inference {self.seconds_inference:.1f} s, Gram {self.seconds_gram:.1f} s, "
                f"fit {self.seconds_fit:.1f} s")


def finetune(float_model: ModelProto, model: ModelProto, plan: QuantPlan, table: QuantTable,
             config: QuantConfig, reader, options: FastFinetuneOptions,
             callbacks: Callbacks = Callbacks()) -> FinetuneReport:
    """Finetune the weighted layers of ``model``: their entries of ``table`` get the fitted
    integer weights, their biases are rewritten in place. ``float_model`` holds the float
    biases (same graph, before bias correction); ``reader`` must rewind()."""
    view, float_view = GraphView(model), GraphView(float_model)
    layers: List[Tuple[LinearLayer, object]] = []  # (layer, its weight use)
    skipped: Dict[str, str] = {}
    seen = set()
    for use in plan.weights:
        name = view.node_name(use.node)
        layer = describe(view, use)
        if isinstance(layer, str):
            skipped[name] = layer
        elif layer.weight_name in seen:
            skipped[name] = f"weight {layer.weight_name} is shared with another layer"
        else:
            seen.add(layer.weight_name)
            layers.append((layer, use))
    for name, reason in skipped.items():
        log.info("fast finetune skips %s: %s", name, reason)
    report = FinetuneReport([], skipped, 0)
    qmodel = write_qdq(model, plan, table, config)
    accumulators = _collect(qmodel, plan, [layer for layer, _ in layers], reader, options, report,
                            callbacks.technique_batches)
    for layer, use in layers:
        t0 = time.perf_counter()
        result = _fit_layer(layer, use, accumulators.pop(layer.name), view, float_view, table, config, options)
        report.seconds_fit += time.perf_counter() - t0
        report.layers.append(result)
        log.info("fast finetune %s: relative output error %.4g -> %.4g", result.name, result.error_before,
                 result.error_after)
        if callbacks.technique_layers is not None:
            callbacks.technique_layers(result, len(report.layers), len(layers))
    log.info(report.summary())
    return report


def _collect(qmodel, plan, layers, reader, options, report, progress) -> Dict[str, GramAccumulator]:
    qview = GraphView(qmodel)
    graph_inputs = set(qview.graph_inputs)
    planned = set(plan.activations)
    # each layer's input as the quantized model's consumers read it (after its QDQ pair)
    source_of = {layer.name: dequantized_name(layer.node.input[0], qview.graph_outputs)
                 if layer.node.input[0] in planned else layer.node.input[0] for layer in layers}
    names = list(dict.fromkeys(source_of.values()))
    fetch = [n for n in names if n not in graph_inputs]
    # The same outputs, but onnxruntime runs the layers as integer convolutions (3.5x
    # faster on XINT8's ReLU6 nets than the float convolutions between Q and DQ).
    inference_model, _ = with_requantized_layer_outputs(qmodel)
    runner = BoundRunner(make_session(truncated(inference_model, fetch)), fetch) if fetch else None
    accumulators = {layer.name: GramAccumulator(layer.groups, layer.k) for layer in layers}
    reader.rewind()
    total = batch_count(reader)
    if options.data_batches is not None and total is not None:
        total = min(total, options.data_batches)
    samples = batches = 0
    # Dense and pointwise layers (numpy products on one BLAS thread, pyquant.threads) run
    # side by side in the kernels' share of threads; window Grams are parallel inside.
    dense = [layer for layer in layers if layer.kernel is None or layer.is_pointwise]
    windowed = [layer for layer in layers if not (layer.kernel is None or layer.is_pointwise)]
    pool = ThreadPoolExecutor(max_workers=threads.current().kernels, thread_name_prefix="pyquant-gram")
    try:
        for feed in prefetch(reader):
            t0 = time.perf_counter()
            values = dict(zip(fetch, runner.run(feed))) if runner else {}
            for n in names:
                if n in graph_inputs:
                    values[n] = np.asarray(feed[n], dtype=np.float32)
            t1 = time.perf_counter()
            for done in [pool.submit(accumulators[layer.name].update_layer, layer, values[source_of[layer.name]])
                         for layer in dense]:
                done.result()
            for layer in windowed:
                accumulators[layer.name].update_layer(layer, values[source_of[layer.name]])
            report.seconds_inference += t1 - t0
            report.seconds_gram += time.perf_counter() - t1
            del values
            samples += batch_samples(feed)
            batches += 1
            if progress is not None:
                progress(batches, total)
            if (options.data_size is not None and samples >= options.data_size) or \
                    (options.data_batches is not None and batches >= options.data_batches):
                break
    finally:
        pool.shutdown()
    if samples == 0:
        raise DataError("the calibration data reader produced no batch after rewind()")
    report.samples = samples
    log.info("fast finetune read %d samples in %d batches", samples, batches)
    return accumulators


def _fit_layer(layer: LinearLayer, use, acc: GramAccumulator, view: GraphView, float_view: GraphView,
               table: QuantTable, config: QuantConfig, options: FastFinetuneOptions) -> LayerResult:
    t0 = time.perf_counter()
    centered = options.update_bias and layer.bias_input is not None
    w = layer.weight.astype(np.float64)
    a, mean_q = acc.moments(centered)
    # t_r = A w_r: the float weights' output on x_q (matmul: BLAS, 3.5x numpy's einsum loop on the classifier)
    target = np.matmul(w, np.swapaxes(a, 1, 2))
    const = np.einsum("grk,grk->gr", w, target)  # its (centered) second moment
    entry = table.weight(use, config.per_channel)
    qp = entry.qparams
    scale = np.broadcast_to(layer.row_values(qp.scale) if qp.axis is not None else qp.scale,
                            (layer.groups, layer.rows)).astype(np.float64)
    qtype = config.weight_type
    nearest = np.clip(np.round(w / scale[..., None]), qtype.qmin, qtype.qmax)
    fit = kernels.fit_rounding(layer.weight, scale, a, target, qtype.qmin, qtype.qmax,
                               algorithm=_ALGORITHM[options.algorithm], iterations=options.iterations,
                               learning_rate=options.learning_rate, reg_param=options.reg_param,
                               beta_range=options.beta_range, warm_start=options.warm_start,
                               keep_best=options.early_stop)
    q = fit.q.astype(np.float64)

    def relative_error(qq: np.ndarray) -> float:
        wt = scale[..., None] * qq
        e = np.einsum("grk,grk->gr", wt, np.matmul(wt, a) - 2 * target) + const  # (reported only)
        return float(max(e.sum(), 0.0) / max(const.sum(), 1e-30))

    if layer.bias_input is not None:
        shift = np.einsum("grk,gk->gr", w, mean_q) - np.einsum("grk,gk->gr", scale[..., None] * q, mean_q)
        _write_bias(layer, view, float_view, shift, options.update_bias)
    table.weights[weight_key(use, config.per_channel)] = QuantizedWeight(qp, layer.to_onnx_layout(fit.q).astype(np.int8))
    return LayerResult(layer.name, relative_error(nearest), relative_error(q), int((q != nearest).sum()),
                       int(q.size), time.perf_counter() - t0)
def _write_bias(layer: LinearLayer, view: GraphView, float_view: GraphView, shift: np.ndarray,
                update: bool) -> None:
    """bias = float bias + shift per output channel, shift = W E[x_target] - W~ E[x_q]: the
    mean output shift of the quantized layer on its real inputs (bias correction, Nagel et al. 2019)."""
    node = layer.node
    idx = layer.bias_input
    float_node = float_view.producer[node.output[0]]  # the same layer in the float model
    original = None
    if len(float_node.input) > idx and float_node.input[idx]:
        original = float_view.constant_value(float_node.input[idx])
    bias = np.zeros(layer.groups * layer.rows) if original is None else original.astype(np.float64).ravel()
    if update:
        bias = bias + shift.ravel()
    name = f"{node.output[0]}_bias_finetuned"
    view.replace_initializer(name, bias.astype(np.float32))
    while len(node.input) < idx:
        node.input.append("")
    if len(node.input) == idx:
        node.input.append(name)
    else:
        node.input[idx] = name


class FastFinetune(Technique):
    """Learned rounding (or weights) of every Conv/Gemm/MatMul layer; reads the
    calibration data a second time."""

    name = "fast_finetune"
    stage = Stage.PARAMETERS
    rereads_data = True
    needs_float_model = True

    def __init__(self, options: FastFinetuneOptions) -> None:
        self.options = options

    @classmethod
    def from_config(cls, config) -> Optional["FastFinetune"]:
        return cls(config.fast_finetune) if config.fast_finetune is not None else None

    def apply(self, state: QuantState) -> None:
        state.reports[self.name] = finetune(state.float_model, state.model, state.plan, state.table, state.config,
                                            state.reader, self.options, state.callbacks)
        state.replan()  # layers may have gained a bias input
