"""What a run did, for people and for tools: which nodes and tensors stayed float and why,
what graph preparation changed, and each technique's summary. The CLI prints the summary
(count per reason at INFO, a WARNING when more than half of the compute stayed float)
and writes the whole as JSON with ``--report FILE.json``."""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from typing import Any, Dict, List, Sequence

from onnx import ModelProto

from .graph.model_io import write_text_atomic
from .graph.plan import QuantPlan

log = logging.getLogger(__name__)

# Ops whose arithmetic dominates a network's cost: the share of them left in float is
# what the warning measures.
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "LSTM", "GRU", "RNN", "Attention")


@dataclasses.dataclass
class RunReport:
    activations: int
    weights: int
    biases: int
    float_nodes: Dict[str, str]  # node -> reason it stayed float
    float_tensors: Dict[str, str]  # tensor -> reason it is not quantized
    compute_nodes: int
    compute_float: List[str]  # compute nodes left in float
    preparation: str
    techniques: Dict[str, str]  # technique -> its summary

    @property
    def reasons(self) -> Dict[str, int]:
        return dict(collections.Counter(self.float_nodes.values()).most_common())

    def log(self) -> None:
        log.info("quantized %d activations, %d weights, %d biases; %d nodes left in float",
                 self.activations, self.weights, self.biases, len(self.float_nodes))
        for reason, count in self.reasons.items():
            log.info("  %d node(s): %s", count, reason)
        for name, reason in self.float_tensors.items():
            log.info("  tensor %s not quantized: %s", name, reason)
        if self.compute_nodes and 2 * len(self.compute_float) > self.compute_nodes:
            log.warning("%d of %d compute nodes (%s) stayed in float; see the reasons above",
                        len(self.compute_float), self.compute_nodes, "/".join(COMPUTE_OPS[:4]))

    def as_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["reasons"] = self.reasons
        return out

    def write_json(self, path: "os.PathLike[str] | str") -> None:
        """Written under a temporary name and renamed: never a half-written report."""
        write_text_atomic(path, json.dumps(self.as_dict(), indent=2) + "\n")


def run_report(model: ModelProto, plan: QuantPlan, reports: Dict[str, Any],
               body_plans: Sequence[QuantPlan] = ()) -> RunReport:
    """The report of one run: ``model`` is the prepared float model ``plan`` was made from,
    ``reports`` the techniques' reports by name (each may have a ``summary()``);
    ``body_plans``: the plans of the Loop/Scan bodies quantized, counted in (their float
    nodes and tensors are in ``plan`` already, pyquant.pipeline)."""
    compute = [n for n in model.graph.node if n.op_type in COMPUTE_OPS]
    names = {id(n): n.name or f"{n.op_type}({n.output[0]})" for n in compute}
    compute_float = [names[id(n)] for n in compute if names[id(n)] in plan.skipped]
    summaries = {name: (r.summary() if callable(getattr(r, "summary", None)) else str(r))
                 for name, r in reports.items() if name != "preparation"}
    preparation = reports.get("preparation")
    plans = [plan, *body_plans]
    return RunReport(sum(len(p.activations) for p in plans), sum(len(p.weights) for p in plans),
                     sum(len(p.biases) for p in plans), dict(plan.skipped),
                     dict(plan.float_tensors), len(compute), compute_float,
                     preparation.summary() if preparation is not None else "", summaries)
