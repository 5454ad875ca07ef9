"""Real models as shipped (benchmarks/corpus.py) under pyquant's presets and onnxruntime's
quantizer. Prints two markdown tables: one row per model x configuration, then the corpus
(inputs, what the float model does on them, cross-layer-equalization pairs):

- output SQNR vs float: 10 log10(sum f^2 / sum (f - q)^2) over every float output of
  every held-out call (streaming models run on their own fed-back state);
- the model's task metric against the float model on the same held-out inputs;
- quantize seconds (wall time of the quantizer call), QDQ pairs (QuantizeLinear nodes,
  subgraphs included), what stayed float (pyquant: node count per reason from the plan;
  onnxruntime: op types of nodes that read no DequantizeLinear output);
- a failure as the stage, exception type and first line of its message (each cell is
  caught; one failure never stops the run);
- with --before-python: "SQNR before", "metric before" and "pairs before", the same
  pyquant configuration run by another interpreter whose pyquant predates graph
  preparation (commit b5cf32f: python -m venv /tmp/basevenv && /tmp/basevenv/bin/pip
  install <a checkout of b5cf32f>), in a subprocess, on the same calibration feeds (passed
  as a pickle file). That pyquant refuses models below opset 13: those are given to it as
  onnx.version_converter.convert_version(model, 13) (marked in the table). A failure of
  the old run is prefixed "before:" in the failure column;
- per model (corpus table): the pairs pyquant.techniques.cle.find_pairs finds on the
  model after BatchNormalization folding only (fold_batch_norm on a copy: the unprepared
  model) and on pyquant.pipeline.prepare(model), checked on the first calibration feed.

    python benchmarks/real_models.py [--models minilm,yolov8n,...]
        [--configs u8s8_pc,u8s8,xint8,ort_pc,int8_cle,u8s8_pc_ebc,...] [--cle-models ppocr-det|all]
        [--before-python /tmp/basevenv/bin/python]

int8_cle (pyquant INT8_CLE: XINT8 with cross-layer equalization) runs only on the models of
--cle-models (default ppocr-det, the detector of issue 18). Models are fed as shipped: the
point is what pyquant does with them. The cache and run-time needs are those of
benchmarks/corpus.py. Not collected by pytest.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import pickle
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
from pyquant.config import CalibrationMethod as RangeMethod, get_preset  # noqa: E402
from pyquant.graph.rewrites.batchnorm import fold_batch_norm  # noqa: E402
from pyquant.pipeline import prepare  # noqa: E402
from pyquant.techniques.cle import find_pairs  # noqa: E402

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


@dataclasses.dataclass(frozen=True)
class Config:
    label: str
    make: Callable[[], Quantizer]
    preset: Optional[str] = None  # pyquant configurations: the preset, for the old interpreter too
    per_channel: bool = False


def _pyquant(label: str, preset: str, per_channel: bool = False, **fields) -> Config:
    """A pyquant configuration: the preset, per-channel if asked, with ``fields`` replaced
    (such rows have no --before-python run: the old pyquant lacks the fields)."""
    config = lambda: dataclasses.replace(get_preset(preset), per_channel=per_channel or get_preset(preset).per_channel,
                                         **fields)
    return Config(label, lambda: pyquant_quantizer(config()), None if fields else preset, per_channel)


CONFIGS: Dict[str, Config] = {
    "u8s8_pc": _pyquant("pyquant U8S8 per-channel", "U8S8", per_channel=True),
    "u8s8_pc_ebc": _pyquant("pyquant U8S8 per-channel + empirical bias correction (1 pass)", "U8S8",
                            per_channel=True, empirical_bias_correction=1),
    "u8s8_pc_ebc2": _pyquant("pyquant U8S8 per-channel + empirical bias correction (2 passes)", "U8S8",
                             per_channel=True, empirical_bias_correction=2),
    "u8s8_pc_minmax_ebc": _pyquant("pyquant U8S8 per-channel, MinMax ranges + empirical bias correction (1 pass)",
                                   "U8S8", per_channel=True, calibrate_method=RangeMethod.MinMax,
                                   empirical_bias_correction=1),
    "u8s8_pc_clipped": _pyquant("pyquant U8S8 per-channel, Percentile ranges everywhere (no whole ranges near the "
                                "outputs: the preset before 2026-11-30)", "U8S8", per_channel=True,
                                unclipped_output_layers=None, clipped_input_layers=None),
    "u8s8_clipped": _pyquant("pyquant U8S8, Percentile ranges everywhere (the preset before 2026-11-30)", "U8S8",
                             unclipped_output_layers=None, clipped_input_layers=None),
    "u8s8_pc_unclipped6": _pyquant("pyquant U8S8 per-channel, whole range within 6 layers of the outputs, "
                                   "inputs' side included", "U8S8", per_channel=True, unclipped_output_layers=6,
                                   clipped_input_layers=None),
    "u8s8_pc_unclipped4": _pyquant("pyquant U8S8 per-channel, whole range within 4 layers of the outputs, "
                                   "inputs' side included", "U8S8", per_channel=True, unclipped_output_layers=4,
                                   clipped_input_layers=None),
    "u8s8_ebc": _pyquant("pyquant U8S8 + empirical bias correction (1 pass)", "U8S8", empirical_bias_correction=1),
    "xint8_ebc": _pyquant("pyquant XINT8 + empirical bias correction (1 pass)", "XINT8", empirical_bias_correction=1),
    "u8s8": _pyquant("pyquant U8S8", "U8S8"),
    "xint8": _pyquant("pyquant XINT8", "XINT8"),
    "ort_pc": Config("onnxruntime quantize_static QDQ U8S8 per-channel MinMax", lambda: ort_quantize),
    "int8_cle": _pyquant("pyquant INT8_CLE", "INT8_CLE"),
}
CLE_CONFIGS = {"int8_cle"}  # run only on --cle-models


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


# Run by the --before-python interpreter in a folder of its own (so that its own pyquant,
# not this checkout's, is imported): quantize one model with the pyquant installed there.
# argv: model path, feeds pickle, preset, per-channel 0/1, output model, result JSON.
BEFORE_WORKER = r"""
import dataclasses, json, pickle, sys, time
import onnx
from onnx import version_converter
model_path, feeds_path, preset, per_channel, out_path, result_path = sys.argv[1:7]
result = {"converted": False, "stage": "load"}
try:
    import pyquant
    model = onnx.load(model_path)
    version = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if version < 13:
        result["stage"] = "opset conversion"
        model = version_converter.convert_version(model, 13)
        result["converted"] = True
    with open(feeds_path, "rb") as f:
        feeds = pickle.load(f)
    config = pyquant.get_preset(preset)
    if per_channel == "1":
        config = dataclasses.replace(config, per_channel=True)
    result["stage"] = "quantize"
    start = time.perf_counter()
    quantized = pyquant.quantize(model, list(feeds), config)
    result["seconds"] = time.perf_counter() - start
    result["stage"] = "save"
    onnx.save(quantized, out_path)
    result["stage"] = None
except Exception as e:
    lines = str(e).strip().splitlines()
    result["error"] = [type(e).__name__, lines[0] if lines else ""]
with open(result_path, "w") as f:
    json.dump(result, f)
"""
BEFORE_TIMEOUT_S = 3600


@dataclasses.dataclass
class Before:
    """One configuration run by the old interpreter: the row's extra cells."""
    sqnr: str = ""
    metric: str = ""
    pairs: str = ""
    failure: str = ""
    converted: bool = False


def run_before(python: str, config: Config, task: corpus.Task, path: Path, feeds_file: Path,
               ref: corpus.Outputs) -> Before:
    before = Before()
    with tempfile.TemporaryDirectory(prefix="pyquant-before-") as tmp:
        out, result_file = Path(tmp) / "q.onnx", Path(tmp) / "result.json"
        try:
            done = subprocess.run([python, "-c", BEFORE_WORKER, str(path), str(feeds_file), config.preset,
                                   "1" if config.per_channel else "0", str(out), str(result_file)],
                                  cwd=tmp, capture_output=True, text=True, timeout=BEFORE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            before.failure = f"before: quantize: timeout after {BEFORE_TIMEOUT_S} s"
            return before
        if not result_file.exists():
            last = (done.stderr.strip().splitlines() or [""])[-1][:MESSAGE_CHARS]
            before.failure = f"before: worker exit {done.returncode}: {last}"
            return before
        result = json.loads(result_file.read_text())
        before.converted = result["converted"]
        if result.get("error"):
            kind, first = result["error"]
            first = first if len(first) <= MESSAGE_CHARS else first[:MESSAGE_CHARS] + "..."
            before.failure = f"before: {result['stage']}: {kind}: {first}"
            return before
        stage = "run"
        try:
            model = onnx.load(str(out))
            before.pairs = str(qdq_pairs(model))
            test = task.run(session(model))
            stage = "score"
            before.sqnr = f"{corpus.sqnr_db(ref, test):.1f}"
            before.metric = task.score(ref, test).text
        except Exception as e:  # noqa: BLE001
            logging.debug("%s", traceback.format_exc())
            before.failure = "before: " + failure(stage, e)
    return before


def cle_pairs(path: Path, feeds: List[corpus.Feed]) -> str:
    """'unprepared -> prepared': CLE pairs after BatchNormalization folding only, and on
    the prepared model (preparation checked on the first calibration feed)."""
    counts = []
    for stage in ("unprepared", "prepared"):
        try:
            model = onnx.load(str(path))
            if stage == "unprepared":
                fold_batch_norm(model)
            else:
                model = prepare(model, feeds[:1])
            counts.append(str(len(find_pairs(model)[0])))
        except Exception as e:  # noqa: BLE001
            logging.debug("%s", traceback.format_exc())
            counts.append(f"({failure(stage, e)})")
    return " -> ".join(counts)


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
    parser.add_argument("--cle-models", default="ppocr-det",
                        help=f"models that {','.join(sorted(CLE_CONFIGS))} runs on: comma-separated, or all")
    parser.add_argument("--before-python", metavar="PYTHON",
                        help="an interpreter whose pyquant predates graph preparation (b5cf32f): the pyquant "
                             "configurations run there too, as the 'before' columns")
    parser.add_argument("--debug", action="store_true", help="log each failure's traceback")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = args.models.split(",") if args.models else [m.name for m in corpus.MODELS]
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; valid: {', '.join(CONFIGS)}")
    cle_models = set(names) if args.cle_models == "all" else set(args.cle_models.split(","))
    before_python = args.before_python
    if before_python and not (Path(before_python).is_file() and os.access(before_python, os.X_OK)):
        parser.error(f"--before-python {before_python} is not an executable file")

    started = time.perf_counter()
    print(f"machine load at start (1/5/15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs; onnxruntime {ort.__version__}, onnx {onnx.__version__}", flush=True)
    print(pyquant_source() + "\n", flush=True)
    if before_python:
        print(f"before: {before_python_source(before_python)}\n", flush=True)
    paths = corpus.fetch(names)
    about, converted = [], set()
    print("| model | configuration | SQNR dB |" + (" SQNR before |" if before_python else "") + " task metric |"
          + (" metric before |" if before_python else "") + " quantize s | QDQ pairs |"
          + (" pairs before |" if before_python else "") + " stayed float | failure |")
    print("|---" * (8 + 3 * bool(before_python)) + "|", flush=True)
    with tempfile.TemporaryDirectory(prefix="pyquant-feeds-") as feeds_dir:
        for name in names:
            entry, path = corpus.get(name), paths[name]
            try:
                task = entry.task(path)
                feeds = task.calibration()
                ref = task.run(corpus.float_session(path))
                check = task.float_check(ref)
            except Exception as e:  # noqa: BLE001
                print(f"| {name} | (float model) |" + " |" * (6 + 3 * bool(before_python))
                      + f" {_cell(failure('inputs', e))} |", flush=True)
                continue
            print(f"[{name} x CLE pairs]", file=sys.stderr, flush=True)
            about.append(f"| {name} | {entry.package}=={entry.version} | {Path(entry.member).name} | {opset(path)} | "
                         f"{_cell(task.inputs)} | {_cell(check)} | {_cell(cle_pairs(path, feeds))} | "
                         f"{_cell(entry.about)} |")
            feeds_file = Path(feeds_dir) / f"{name}.pkl"
            if before_python:
                with open(feeds_file, "wb") as f:
                    pickle.dump(list(feeds), f, protocol=pickle.HIGHEST_PROTOCOL)
            for key in configs:
                if key in CLE_CONFIGS and name not in cle_models:
                    continue
                config = CONFIGS[key]
                print(f"[{name} x {key}]", file=sys.stderr, flush=True)
                row = run_cell(task, path, feeds, ref, config.make())
                if before_python:
                    before = Before(sqnr="-", metric="-", pairs="-")
                    if config.preset is not None:
                        print(f"[{name} x {key} before]", file=sys.stderr, flush=True)
                        before = run_before(before_python, config, task, path, feeds_file, ref)
                        if before.converted:
                            converted.add(name)
                            before.pairs = (before.pairs + " *").strip()
                    row = [row[0], before.sqnr, row[1], before.metric, row[2], row[3], before.pairs, row[4],
                           "; ".join(f for f in (row[5], before.failure) if f)]
                print(f"| {name} | {config.label} | " + " | ".join(_cell(c) for c in row) + " |", flush=True)

    if converted:
        print(f"\n\\* the pyquant before graph preparation refuses opset < 13: {', '.join(sorted(converted))} "
              "were given to it as onnx.version_converter.convert_version(model, 13); the current pyquant "
              "takes them as shipped (its preparation upgrades them).")
    print("\n| model | package | file | opset | calibration / held-out inputs | float model on held-out | "
          "CLE pairs: unprepared (BN folded) -> prepared | about |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(about))
    print(f"\nmachine load at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"total {time.perf_counter() - started:.0f} s")


def before_python_source(python: str) -> str:
    """Where the old interpreter's pyquant comes from, and its version."""
    probe = "import pyquant, onnx, onnxruntime; print(pyquant.__file__, getattr(pyquant, '__version__', '?'), " \
            "'onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__)"
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([python, "-c", probe], cwd=tmp, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else f"{python} cannot import pyquant: " \
        + (done.stderr.strip().splitlines() or [""])[-1]


if __name__ == "__main__":
    main()
