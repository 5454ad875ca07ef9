"""Layer sensitivity: which layers cost the accuracy of a quantized model.

The model is quantized once. For every layer (pyquant.graph.bypass: a node with the
quantized activations, weight and bias it reads; or a model output's own QDQ pair) two
variants of the QDQ model are run on a small held-out set and their outputs compared
with the float model's (SQNR and cosine of all outputs, KL of the softmax over the last
axis):

  * only this layer quantized: every other layer reads float values; what this layer's
    rounding alone costs;
  * only this layer in float: this layer reads float values, all others stay quantized;
    what leaving it in float wins back.

Both variants are the written QDQ model with node inputs rewired, so they are exact and
need no new calibration. Besides, every float tensor of the network is compared with the
same tensor of the quantized model (where error enters and where it grows), and the
report shows the histograms of the worst layers' input activations with the clipping
range their scale allows, and the per-channel weight ranges of the worst layers.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from onnx import ModelProto

from .. import threads as thread_budget
from ..api import ModelLike, as_reader, quantize_detailed, resolve_config
from ..config import DEFAULT_CALIB_BATCH_SIZE, QuantConfig, QuantType
from ..data import Preprocess
from ..errors import ConfigError, DataError
from ..graph.bypass import Layer, QdqLayers
from ..graph.model_io import load_model, write_text_atomic
from ..graph.view import GraphView
from ..layer_report import (ErrorStats, Figure, LayerReport, LayerRow, compare, onnx_source, plot_along_network,
                            plot_channel_ranges, plot_histogram)
from ..pipeline import QuantizeResult
from ..runtime import make_session
from .outputs import DEFAULT_HELD_OUT_SAMPLES, OutputComparison, OutputError, read_feeds, rereadable

log = logging.getLogger(__name__)

ONLY_QUANTIZED = "only this layer quantized"
ONLY_FLOAT = "only this layer float"
# Figures of the report: histograms of the input activations of this many worst layers,
# weight ranges per channel of this many worst layers with a weight.
WORST_HISTOGRAMS = 4
WORST_WEIGHTS = 3
HISTOGRAM_BINS = 256


@dataclasses.dataclass
class LayerSensitivity:
    layer: Layer
    only_quantized: OutputError
    only_float: OutputError


@dataclasses.dataclass
class Histogram:
    tensor: str
    counts: np.ndarray
    edges: np.ndarray
    clip: Optional[Tuple[float, float]]  # the range the tensor's scale and zero point can represent


@dataclasses.dataclass
class WeightRanges:
    weight: str
    values: np.ndarray
    axis: int


@dataclasses.dataclass
class SensitivityResult:
    """Per-layer sensitivity (network order), the quantized model's output error, the
    per-tensor error along the network, and the data of the report's figures."""

    title: str
    quantized_model: ModelProto
    config: QuantConfig
    quantized: OutputError  # every layer quantized
    layers: List[LayerSensitivity]
    tensors: LayerReport  # series "quantized": each float tensor against the quantized model's
    histograms: List[Histogram]
    weight_ranges: List[WeightRanges]
    held_out_samples: int
    seconds: float

    def ranked(self) -> List[LayerSensitivity]:
        """Most sensitive first: the lowest output SQNR with only this layer quantized."""
        return sorted(self.layers, key=lambda s: _sort_key(s.only_quantized.sqnr_db))

    def layer_report(self) -> LayerReport:
        rows = []
        for s in self.layers:
            # a row per layer: its name stands in the tensor column, what it reads in the notes
            row = LayerRow(s.layer.name, s.layer.name, s.layer.op_type, s.layer.position,
                           {ONLY_QUANTIZED: s.only_quantized.stats, ONLY_FLOAT: s.only_float.stats},
                           {"kl only quantized": s.only_quantized.kl, "kl only float": s.only_float.kl,
                            "float gain dB": s.only_float.sqnr_db - self.quantized.sqnr_db})
            row.notes.append("reads " + ", ".join(s.layer.activations + s.layer.weights))
            rows.append(row)
        return LayerReport(self.title, rows, [ONLY_QUANTIZED, ONLY_FLOAT], self.summary())

    def summary(self) -> List[str]:
        lines = [f"{len(self.layers)} quantized layers, {self.held_out_samples} held-out samples, "
                 f"{self.seconds:.1f} s",
                 f"all layers quantized: output SQNR {self.quantized.sqnr_db:.2f} dB, cosine "
                 f"{self.quantized.cosine:.5f}, KL {self.quantized.kl:.5f}"]
        first = self.tensors.first_divergence("quantized", self.quantized.sqnr_db + 10.0)
        if first is not None:
            lines.append(f"error enters first at {first.tensor} ({first.op_type}, position {first.position}): "
                         f"SQNR {first.metric('quantized'):.2f} dB")
        return lines

    def to_text(self, limit: Optional[int] = 20) -> str:
        return self.layer_report().to_text(sort_by=ONLY_QUANTIZED, limit=limit,
                                           metrics=("sqnr_db",))

    def as_dict(self) -> Dict[str, Any]:
        return {"layers": self.layer_report().as_dict(), "tensors": self.tensors.as_dict(),
                "quantized": _finite(self.quantized.as_dict()), "held_out_samples": self.held_out_samples,
                "seconds": self.seconds}

    def write_json(self, path: "os.PathLike[str] | str") -> None:
        write_text_atomic(path, json.dumps(self.as_dict(), indent=2) + "\n")

    def figures(self) -> List[Figure]:
        """Error along the network (per tensor, and per layer), the worst tensors'
        histograms with their clipping range, the worst layers' weight ranges (matplotlib)."""
        figures = [plot_along_network(self.tensors, title="SQNR of each tensor of the quantized model along the network"),
                   plot_along_network(self.layer_report(), title="output SQNR with one layer quantized / one layer "
                                                                 "float, by the layer's position",
                                      caption="each point is one layer (x: its node's position); low blue points "
                                              "are the layers whose rounding costs most, high orange points those "
                                              "whose float wins most back")]
        figures += [plot_histogram(h.tensor, h.counts, h.edges, h.clip) for h in self.histograms]
        figures += [plot_channel_ranges(w.weight, w.values, w.axis) for w in self.weight_ranges]
        return figures

    def write_html(self, path: "os.PathLike[str] | str") -> None:
        self.layer_report().write_html(path, self.figures(), sort_by=ONLY_QUANTIZED, appendix=[self.tensors])


def _sort_key(sqnr: float) -> float:
    return math.inf if math.isnan(sqnr) else sqnr


def _finite(values: Dict[str, float]) -> Dict[str, Any]:
    return {k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}


def analyze_sensitivity(model: ModelLike, calib_data: Any, config: Any = "XINT8", held_out: Any = None, *,
                        held_out_samples: int = DEFAULT_HELD_OUT_SAMPLES, num_calib: Optional[int] = None,
                        batch_size: Optional[int] = None, threads: Optional[int] = None,
                        preprocess: Optional[Preprocess] = None,
                        quantized: Optional[QuantizeResult] = None, only_float: bool = True,
                        title: Optional[str] = None) -> SensitivityResult:
    """Quantize ``model`` with ``calib_data`` under ``config`` (or take the run
    ``quantized`` already made) and measure each layer's sensitivity on at most
    ``held_out_samples`` samples of ``held_out`` (None: of the calibration data, which is
    then not held out: a warning says so). ``only_float=False`` skips the "only this layer
    float" variants (half the time; their series is then nan)."""
    start = time.perf_counter()
    proto = model if isinstance(model, ModelProto) else load_model(model)
    quant_config = resolve_config(config)
    if quantized is not None and quantized.float_model is None:
        raise ConfigError("the quantization run was made without keep_float_model=True: the analysis needs its "
                          "float model")
    if held_out is None:
        if quantized is None and not rereadable(calib_data):
            raise DataError("without held-out data the calibration data is read twice (calibration, then the "
                            "variants): give held_out, or the data as a path, array, list or a reader with rewind()")
        log.warning("no held-out data: measuring the sensitivity on the calibration data")
        held_out = calib_data
    feeds = read_feeds(held_out, proto, held_out_samples, batch_size, preprocess)
    with thread_budget.budget(threads):  # the reference: the user's float model, checked before any work
        outputs = OutputComparison(proto, feeds)
    if quantized is None:
        reader = as_reader(calib_data, proto, batch_size or quant_config.calib_batch_size or DEFAULT_CALIB_BATCH_SIZE,
                           preprocess, num_calib)
        quantized = quantize_detailed(proto, reader, quant_config, threads=threads, keep_float_model=True)
    with thread_budget.budget(threads):
        layers = QdqLayers(quantized.model, quantized.float_model)
        all_quantized = outputs.error(quantized.model)
        results = []
        for i, layer in enumerate(layers.layers):
            log.debug("layer %d/%d: %s", i + 1, len(layers.layers), layer.name)
            results.append(LayerSensitivity(layer, outputs.error(layers.only_quantized(layer)),
                                            outputs.error(layers.with_float([layer])) if only_float else
                                            OutputError(ErrorStats(), math.nan)))
        title = title or f"Layer sensitivity ({_config_name(config)})"
        tensors = tensor_errors(quantized.float_model, quantized.model, feeds, title)
        ranked = sorted(results, key=lambda s: _sort_key(s.only_quantized.sqnr_db))
        histograms = activation_histograms(quantized.float_model, layers, [s.layer for s in ranked], feeds)
        weights = weight_ranges(quantized, [s.layer for s in ranked])
    return SensitivityResult(title, quantized.model, quant_config, all_quantized, results, tensors, histograms,
                             weights, sum(int(np.shape(next(iter(f.values())))[0]) for f in feeds),
                             time.perf_counter() - start)


def _config_name(config: Any) -> str:
    return config.upper() if isinstance(config, str) else type(config).__name__


def tensor_errors(float_model: ModelProto, qdq: ModelProto, feeds, title: str) -> LayerReport:
    """Each float tensor of the network against the same tensor in the quantized model."""
    view = GraphView(float_model)
    in_qdq = {o for n in qdq.graph.node for o in n.output}
    names = [o for n in float_model.graph.node for o in n.output if o and view.is_float(o) and o in in_qdq]
    report = compare(title + ": tensors along the network", float_model,
                     onnx_source(float_model, {t: t for t in names}),
                     {"quantized": onnx_source(qdq, {t: t for t in names})}, feeds, names)
    return report


def activation_histograms(float_model: ModelProto, layers: QdqLayers, ranked: Sequence[Layer],
                          feeds) -> List[Histogram]:
    """Float histograms of the activations the worst layers read, with the range their
    quantization parameters can represent."""
    chosen: List[str] = []
    for layer in ranked:
        for name in layer.activations:
            if name not in chosen and layers.quantization_params(name) is not None:
                chosen.append(name)
        if len(chosen) >= WORST_HISTOGRAMS:
            break
    chosen = chosen[:WORST_HISTOGRAMS]
    inputs = {i.name for i in float_model.graph.input}
    computed = [t for t in chosen if t not in inputs]
    session = make_session(float_model, computed)
    values: Dict[str, List[np.ndarray]] = {t: [] for t in chosen}
    for feed in feeds:
        got = dict(zip(computed, session.run(computed, feed))) if computed else {}
        for t in chosen:
            values[t].append(np.ravel(feed[t] if t in feed else got[t]).astype(np.float64))
    result = []
    for t in chosen:
        data = np.concatenate(values[t])
        scale, zero_point = layers.quantization_params(t)
        qtype = QuantType.of(zero_point.dtype)
        zero, step = float(zero_point), float(scale)  # numpy integer scalars would wrap around
        clip = ((qtype.qmin - zero) * step, (qtype.qmax - zero) * step)
        lo, hi = min(float(data.min()), clip[0]), max(float(data.max()), clip[1])
        counts, edges = np.histogram(data, bins=HISTOGRAM_BINS, range=(lo, hi) if hi > lo else None)
        result.append(Histogram(t, counts, edges, clip))
    return result


def weight_ranges(quantized: QuantizeResult, ranked: Sequence[Layer]) -> List[WeightRanges]:
    """The float weights of the worst layers that have one, with their output-channel axis."""
    view = GraphView(quantized.float_model)
    axis_of = {use.node.input[use.input_index]: use.channel_axis for use in quantized.plan.weights}
    result = []
    for layer in ranked:
        for weight in layer.weights:
            axis = axis_of.get(weight)
            value = view.constant_value(weight)
            if axis is not None and value is not None and value.ndim > axis:
                result.append(WeightRanges(weight, value, axis))
                break
        if len(result) >= WORST_WEIGHTS:
            break
    return result

