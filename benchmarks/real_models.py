"""Real models as shipped (benchmarks/corpus.py) under pyquant's presets and onnxruntime's
quantizer. Prints two markdown tables: the corpus (inputs, what the float model does on
them), then one row per model x configuration:

- output SQNR vs float: 10 log10(sum f^2 / sum (f - q)^2) over every float output of
  every held-out call (streaming models run on their own fed-back state);
- the model's task metric against the float model on the same held-out inputs;
- quantize seconds (wall time of the quantizer call), QDQ pairs (QuantizeLinear nodes,
  subgraphs included), what stayed float (pyquant: node count per reason from the plan;
  onnxruntime: op types of nodes that read no DequantizeLinear output);
- a failure as the stage, exception type and first line of its message (each cell is
  caught; one failure never stops the run).

    python benchmarks/real_models.py [--models minilm,yolov8n,...] [--configs u8s8_pc,u8s8,xint8,ort_pc]

Models are fed as shipped (no opset upgrade): the point is what pyquant does today. The
cache and run-time needs are those of benchmarks/corpus.py. Not collected by pytest.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402  (the sibling script)
import pyquant  # noqa: E402
from pyquant.api import quantize_detailed  # noqa: E402
from pyquant.config import get_preset  # noqa: E402

Quantizer = Callable[[Path, List[corpus.Feed]], Tuple[onnx.ModelProto, str]]
MESSAGE_CHARS = 180


def pyquant_quantizer(config) -> Quantizer:
    def quantize(path: Path, feeds: List[corpus.Feed]) -> Tuple[onnx.ModelProto, str]:
        result = quantize_detailed(str(path), list(feeds), config)
        return result.model, stayed_float_by_reason(result.plan.skipped, result.model)
    return quantize


class _Feeds(CalibrationDataReader):
    def __init__(self, feeds: List[corpus.Feed]) -> None:
        self.feeds, self.pos = feeds, 0

    def get_next(self) -> Optional[corpus.Feed]:
        self.pos += 1
        return self.feeds[self.pos - 1] if self.pos <= len(self.feeds) else None

    def rewind(self) -> None:
        self.pos = 0


def ort_quantize(path: Path, feeds: List[corpus.Feed]) -> Tuple[onnx.ModelProto, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        quantize_static(str(path), str(out), _Feeds(feeds), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax)
        model = onnx.load(str(out))
    return model, float_ops_without_dq(model)


CONFIGS: Dict[str, Tuple[str, Callable[[], Quantizer]]] = {
    "u8s8_pc": ("pyquant U8S8 per-channel",
                lambda: pyquant_quantizer(dataclasses.replace(get_preset("U8S8"), per_channel=True))),
    "u8s8": ("pyquant U8S8", lambda: pyquant_quantizer(get_preset("U8S8"))),
    "xint8": ("pyquant XINT8", lambda: pyquant_quantizer(get_preset("XINT8"))),
    "ort_pc": ("onnxruntime quantize_static QDQ U8S8 per-channel MinMax", lambda: ort_quantize),
}


def _short_reason(reason: str) -> str:
    """'op type Softmax has no quantized form here' -> 'no quantized form'; otherwise the
    reason up to its first ':' or ' (' (at most 50 characters)."""
    if re.fullmatch(r"op type \S+ has no quantized form.*", reason):
        return "no quantized form"
    return re.split(r":| \(", reason, maxsplit=1)[0][:50]


def stayed_float_by_reason(skipped: Dict[str, str], model: onnx.ModelProto) -> str:
    """'reason: OpType count, ...; ...' over the plan's skipped nodes, largest group first."""
    op_of = {n.name or f"{n.op_type}({n.output[0]})": n.op_type for n in _all_nodes(model.graph)}
    groups: Dict[str, collections.Counter] = {}
    for node, reason in skipped.items():
        op = op_of.get(node) or (re.match(r"(\w+)\(", node) or [None, "?"])[1]
        groups.setdefault(_short_reason(reason), collections.Counter())[op] += 1
    return "; ".join(f"{group}: " + ", ".join(f"{op} {n}" for op, n in ops.most_common())
                     for group, ops in sorted(groups.items(), key=lambda kv: -sum(kv[1].values()))) or "-"


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _all_nodes(sub)


def qdq_pairs(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "QuantizeLinear" for n in _all_nodes(model.graph))


def float_ops_without_dq(model: onnx.ModelProto) -> str:
    """Op types (main graph) of nodes that read no DequantizeLinear output."""
    from_dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    skip = {"QuantizeLinear", "DequantizeLinear", "Constant"}
    counts = collections.Counter(n.op_type for n in model.graph.node
                                 if n.op_type not in skip and not any(i in from_dq for i in n.input))
    return "no DQ input: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()) if counts else "-"


def session(model: onnx.ModelProto):
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 2, 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def failure(stage: str, error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    first = first if len(first) <= MESSAGE_CHARS else first[:MESSAGE_CHARS] + "..."
    return f"{stage}: {type(error).__name__}: {first}"


def run_cell(task: corpus.Task, path: Path, feeds: List[corpus.Feed], ref: corpus.Outputs,
             quantizer: Quantizer) -> List[str]:
    """[SQNR, metric, seconds, QDQ pairs, stayed float, failure] for one model x configuration."""
    row = ["", "", "", "", "", ""]
    stage = "quantize"
    try:
        start = time.perf_counter()
        model, stayed = quantizer(path, feeds)
        row[2] = f"{time.perf_counter() - start:.1f}"
        row[3], row[4] = str(qdq_pairs(model)), stayed
        stage = "run"
        test = task.run(session(model))
        stage = "score"
        row[0] = f"{corpus.sqnr_db(ref, test):.1f}"
        row[1] = task.score(ref, test).text
    except Exception as e:  # noqa: BLE001  (a cell reports its failure; the run goes on)
        logging.debug("%s", traceback.format_exc())
        row[5] = failure(stage, e)
    return row


def opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def pyquant_source() -> str:
    """Where pyquant comes from: this checkout (its HEAD, and whether pyquant/ or csrc/ has
    uncommitted changes) or an installed copy."""
    where = Path(pyquant.__file__).resolve().parent
    if where.parent != corpus.REPO:
        return f"pyquant {where} (an installed copy, not this checkout)"
    try:
        git = ["git", "-C", str(corpus.REPO)]
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "pyquant", "csrc"], capture_output=True, text=True,
                               check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return f"pyquant {where} (git state unknown)"
    return f"pyquant {where} at {head.strip()}" + (" with uncommitted changes in pyquant/ or csrc/" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated corpus names (default: all): "
                                         + ",".join(m.name for m in corpus.MODELS))
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {','.join(CONFIGS)}")
    parser.add_argument("--debug", action="store_true", help="log each failure's traceback")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = args.models.split(",") if args.models else [m.name for m in corpus.MODELS]
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; valid: {', '.join(CONFIGS)}")

    started = time.perf_counter()
    print(f"machine load at start (1/5/15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs; onnxruntime {ort.__version__}, onnx {onnx.__version__}", flush=True)
    print(pyquant_source() + "\n", flush=True)
    paths = corpus.fetch(names)
    about = []
    print("| model | configuration | SQNR dB | task metric | quantize s | QDQ pairs | stayed float | failure |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for name in names:
        entry, path = corpus.get(name), paths[name]
        try:
            task = entry.task(path)
            feeds = task.calibration()
            ref = task.run(corpus.float_session(path))
            check = task.float_check(ref)
        except Exception as e:  # noqa: BLE001
            print(f"| {name} | (float model) | | | | | | {_cell(failure('inputs', e))} |", flush=True)
            continue
        about.append(f"| {name} | {entry.package}=={entry.version} | {Path(entry.member).name} | {opset(path)} | "
                     f"{_cell(task.inputs)} | {_cell(check)} | {_cell(entry.about)} |")
        for key in configs:
            label, make = CONFIGS[key]
            print(f"[{name} x {key}]", file=sys.stderr, flush=True)
            row = run_cell(task, path, feeds, ref, make())
            print(f"| {name} | {label} | " + " | ".join(_cell(c) for c in row) + " |", flush=True)

    print("\n| model | package | file | opset | calibration / held-out inputs | float model on held-out | about |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(about))
    print(f"\nmachine load at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
