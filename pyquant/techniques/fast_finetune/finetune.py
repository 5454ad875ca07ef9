"""Fast finetune over the calibration data, stage by stage.

For each stage of consecutive layers: write the current quantized model (earlier stages
finetuned, this stage nearest-rounded), run it over the calibration data with the stage's
layer inputs as outputs, stream those into one GramAccumulator per layer, then fit each
layer's integer weights in C++ (pyquant.kernels.fit_rounding) and its bias in closed form.
One batch of activations is alive at a time.

Objective: each layer's output with float weights, W x_q, reproduced by W~ x_q, on the
inputs x_q the quantized network really produces (AdaRound's layer-wise loss). The
target is the output before the activation function: the squared error of a linear map
is a quadratic form of the weights, which makes the Gram form (cost independent of the
calibration set size) exact; the price is that errors a following ReLU/ReLU6 would clip
away still count. We measured the alternative target W x_f (float network's inputs, so
that a layer also compensates upstream errors) on EfficientNet-Lite0: fitted for many
layers from one pass, every layer compensates the same upstream error and the model
collapses (2.8 % top-1); it is only sound strictly one layer per pass, 50 passes here.
The option FinetuneTarget.Unquantized takes the middle road: W x_u with x_u the layer's
input in the quantized network before its own quantizer, so each layer absorbs its own
input's quantization error and nothing upstream.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
from onnx import ModelProto

from ... import kernels
from ...calibrate.methods import QParams, weight_qparams
from ...calibrate.runner import ProgressCallback, _BoundRunner, _prefetch, batch_count, batch_samples, make_session
from ...config import QuantConfig
from ...errors import DataError
from ...graph.plan import QuantPlan, plan_for
from ...graph.qdq import FixedWeight, dequantized_name, write_qdq
from ...graph.view import GraphView, truncated
from .gram import GramAccumulator, LinearLayer, describe
from .options import FastFinetuneOptions, FinetuneAlgorithm, FinetuneTarget

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
    passes: int
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
        return (f"fast finetune: {len(self.layers)} layers, {self.passes} passes over {self.samples} samples; "
                f"mean relative output error {before:.4g} -> {after:.4g}; {100 * changed:.1f}% of weights "
                f"rounded the other way; inference {self.seconds_inference:.1f} s, Gram {self.seconds_gram:.1f} s, "
                f"fit {self.seconds_fit:.1f} s")


LayerCallback = Callable[[LayerResult, int, int], None]  # (result, layers done, total)


def require_rewind(reader) -> None:
    """DataError unless ``reader`` can be read again (fast finetune makes several passes)."""
    if not callable(getattr(reader, "rewind", None)):
        raise DataError("fast finetune reads the calibration data more than once: the data reader needs a "
                        "rewind() method")


def finetune(float_model: ModelProto, model: ModelProto, plan: QuantPlan, act_qparams: Mapping[str, QParams],
             config: QuantConfig, reader, options: FastFinetuneOptions,
             progress: Optional[ProgressCallback] = None,
             on_layer: Optional[LayerCallback] = None) -> Tuple[Dict[str, FixedWeight], FinetuneReport]:
    """Finetune the weighted layers of ``model`` (biases are rewritten in place);
    ``float_model`` holds the float biases (same graph, before bias correction).
    Returns the fitted integer weights for write_qdq and a report."""
    require_rewind(reader)
    view, float_view = GraphView(model), GraphView(float_model)
    layers: List[Tuple[LinearLayer, int]] = []  # (layer, weight channel axis)
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
            layers.append((layer, use.channel_axis))
    for name, reason in skipped.items():
        log.info("fast finetune skips %s: %s", name, reason)
    passes = min(options.passes, len(layers)) or 1
    stages = [list(s) for s in np.array_split(np.arange(len(layers)), passes) if len(s)]
    report = FinetuneReport([], skipped, len(stages), 0)
    fixed: Dict[str, FixedWeight] = {}
    batches_per_pass = batch_count(reader)
    total_batches = None if batches_per_pass is None else batches_per_pass * len(stages)
    batches_done = 0
    for stage in stages:
        stage_layers = [layers[i] for i in stage]
        plan = plan_for(model, config)  # biases may have been added
        qmodel = write_qdq(model, plan, act_qparams, config, fixed)
        accumulators, samples, batches_done = _collect_stage(
            qmodel, plan, [layer for layer, _ in stage_layers], reader, options, report,
            progress, batches_done, total_batches)
        report.samples = samples
        for layer, axis in stage_layers:
            t0 = time.perf_counter()
            result = _fit_layer(layer, axis, accumulators.pop(layer.name), view, float_view, config, options, fixed)
            report.seconds_fit += time.perf_counter() - t0
            report.layers.append(result)
            log.info("fast finetune %s: relative output error %.4g -> %.4g", result.name, result.error_before,
                     result.error_after)
            if on_layer is not None:
                on_layer(result, len(report.layers), len(layers))
    log.info(report.summary())
    return fixed, report


def _collect_stage(qmodel, plan, stage_layers, reader, options, report, progress, batches_done, total_batches):
    qview = GraphView(qmodel)
    graph_inputs = set(qview.graph_inputs)
    planned = set(plan.activations)
    # each layer's input as the quantized model's consumers read it (after its QDQ pair)
    source_of = {layer.name: dequantized_name(layer.node.input[0], qview.graph_outputs)
                 if layer.node.input[0] in planned else layer.node.input[0] for layer in stage_layers}
    local = options.target is FinetuneTarget.Unquantized
    # with the local target, also each layer's input before its own quantizer
    before_of = {layer.name: layer.node.input[0] for layer in stage_layers} if local else {}
    names = list(dict.fromkeys([*source_of.values(), *before_of.values()]))
    fetch = [n for n in names if n not in graph_inputs]
    runner = _BoundRunner(make_session(truncated(qmodel, fetch)), fetch) if fetch else None
    accumulators = {layer.name: GramAccumulator(layer.groups, layer.k, with_float=local) for layer in stage_layers}
    reader.rewind()
    samples = 0
    for feed in _prefetch(reader):
        t0 = time.perf_counter()
        values = dict(zip(fetch, runner.run(feed))) if runner else {}
        for n in names:
            if n in graph_inputs:
                values[n] = np.asarray(feed[n], dtype=np.float32)
        t1 = time.perf_counter()
        for layer in stage_layers:
            accumulators[layer.name].update_layer(layer, values[source_of[layer.name]],
                                                  values[before_of[layer.name]] if local else None)
        report.seconds_inference += t1 - t0
        report.seconds_gram += time.perf_counter() - t1
        del values
        samples += batch_samples(feed)
        batches_done += 1
        if progress is not None:
            progress(batches_done, total_batches)
        if options.data_size is not None and samples >= options.data_size:
            break
    if samples == 0:
        raise DataError("the calibration data reader produced no batch after rewind()")
    return accumulators, samples, batches_done


def _fit_layer(layer: LinearLayer, axis: int, acc: GramAccumulator, view: GraphView, float_view: GraphView,
               config: QuantConfig, options: FastFinetuneOptions,
               fixed: Dict[str, FixedWeight]) -> LayerResult:
    t0 = time.perf_counter()
    centered = options.update_bias and layer.bias_input is not None
    w = layer.weight.astype(np.float64)
    if acc.with_float:  # target W x_u, x_u: the input before its own quantizer
        a, mean_q, c, f, mean_u = acc.moments(centered)
        target = np.einsum("gkj,grj->grk", c, w)  # t_r = E[x_q x_u^T] w_r
        const = np.einsum("grk,gkj,grj->gr", w, f, w)
    else:
        a, mean_q = acc.moments(centered)
        mean_u = mean_q
        target = np.einsum("gkj,grj->grk", a, w)  # t_r = A w_r: the float weights' output on x_q
        const = np.einsum("grk,grk->gr", w, target)  # its (centered) second moment
    qp = weight_qparams(float_view.constant_value(layer.weight_name), config,
                        axis if config.per_channel else None)
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
        e = np.einsum("grk,grk->gr", wt, np.einsum("grk,gkj->grj", wt, a) - 2 * target) + const
        return float(max(e.sum(), 0.0) / max(const.sum(), 1e-30))

    if layer.bias_input is not None:
        shift = np.einsum("grk,gk->gr", w, mean_u) - np.einsum("grk,gk->gr", scale[..., None] * q, mean_q)
        _write_bias(layer, view, float_view, shift, options.update_bias)
    fixed[layer.weight_name] = FixedWeight(qp, layer.to_onnx_layout(fit.q).astype(np.int8))
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
