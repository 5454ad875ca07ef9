"""CPU vs NPU, layer by layer: the float model, onnxruntime's CPU run of the QDQ model and
its npu-sim run, compared on every quantized tensor over a few batches
(pyquant.layer_report, the module the sensitivity analysis uses too).

Series: "cpu" and "npu-sim" against float, and "npu-sim vs cpu" (the two integer runs
against each other: where they first differ is where the NPU's arithmetic first shows).
Each row carries the notes the quantizer stored in the model (which rule moved which
position, pyquant.graph.qdq.tensor_notes).
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional

from onnx import ModelProto

from ..graph.qdq import dequantized_name, tensor_notes
from ..layer_report import (Figure, LayerReport, compare, onnx_source, plot_along_network, plot_worst_layers)
from ..runtime import Feed
from .emulator import emulate
from .rules import ASSUMPTIONS, DEFAULT_GENERATION, Rounding

CPU, NPU, NPU_VS_CPU = "cpu", "npu-sim", "npu-sim vs cpu"
# A tensor whose npu-sim run is below this SQNR against the CPU run has diverged (not
# only rounded a tie the other way).
DIVERGENCE_SQNR_DB = 30.0
WORST_LAYERS = 12


def npu_layer_report(float_model: ModelProto, quantized: ModelProto, feeds: Iterable[Feed],
                     generation: str = DEFAULT_GENERATION, rounding: Optional[Rounding] = None) -> LayerReport:
    feeds = list(feeds)
    outputs = {o.name for o in quantized.graph.output}
    present = {o for n in quantized.graph.node for o in n.output}
    tensors = [o for n in float_model.graph.node for o in n.output
               if o and dequantized_name(o, outputs) in present]
    twins = {t: dequantized_name(t, outputs) for t in tensors}
    emulation = emulate(quantized, generation, rounding, observe=list(twins.values()))
    float_source = onnx_source(float_model, {t: t for t in tensors})
    cpu_source = onnx_source(quantized, twins)
    npu_source = onnx_source(emulation.model, {t: emulation.observed[d] for t, d in twins.items()
                                               if d in emulation.observed})
    report = compare(f"CPU (onnxruntime QDQ) vs NPU ({emulation.rules.name}) per layer", float_model, float_source,
                     {CPU: cpu_source, NPU: npu_source}, feeds)
    against_cpu = compare("", float_model, cpu_source, {NPU_VS_CPU: npu_source}, feeds)
    for row in report.rows:
        try:
            row.errors.update(against_cpu.row(row.tensor).errors)
        except KeyError:
            pass
    report.series.append(NPU_VS_CPU)
    notes = tensor_notes(quantized)
    for row in report.rows:
        row.notes.extend(notes.get(row.tensor, []))
    first = report.first_divergence(NPU_VS_CPU, math.inf)
    diverged = report.first_divergence(NPU_VS_CPU, DIVERGENCE_SQNR_DB)
    report.summary += [
        f"{len(feeds)} batch(es); {emulation.describe()}",
        "first tensor where npu-sim and CPU differ at all: " + (f"{first.tensor} ({first.op_type}, "
                                                                f"SQNR {first.metric(NPU_VS_CPU):.1f} dB)" if first else "none"),
        f"first tensor where they diverge (SQNR < {DIVERGENCE_SQNR_DB:g} dB): "
        + (f"{diverged.tensor} ({diverged.op_type})" if diverged else "none"),
        f"{sum(1 for r in report.rows if r.notes)} tensor(s) with positions moved by the NPU rules (notes column)",
        "assumptions: " + "; ".join(ASSUMPTIONS),
    ]
    return report


def npu_report_figures(report: LayerReport, count: int = WORST_LAYERS) -> List[Figure]:
    """SQNR along the network, and the worst layers under npu-sim with all series beside."""
    return [plot_along_network(report, title="SQNR against float (and npu-sim against cpu) along the network"),
            plot_worst_layers(report, NPU, count=count)]
