"""Automatic mixed precision on the real-model corpus (benchmarks/corpus.py): for each
model and preset, the fewest layers promoted (16-bit activations with int8 weights; with
--allow-float, float layers) that bring the model to output SQNR >= 25 dB to float or its
task metric within 1 % of float's, found by pyquant.analysis.auto_mixed_precision.

    python benchmarks/mixed_precision.py [--models minilm,yolov8n,...] [--configs xint8,u8s8_pc]
        [--sqnr 25] [--metric-drop 0.01] [--held-out-samples 64] [--max-trials 30] [--allow-float]

The table's SQNR and task metric columns are the corpus's own measurement on the whole
held-out set (as benchmarks/real_models.py prints them), of the preset alone ("before")
and of the mixed-precision model ("after"). The target inside the search: the task
metric (the corpus's score against the float run, on every held-out input, streaming
models on their own fed-back state) within --metric-drop x float's, or the output SQNR on the first --held-out-samples held-out
samples (the task's held-out feeds; for the streaming voice detectors, whose held-out
run feeds back its own state, the calibration feeds: marked "calib") >= --sqnr; the
"search SQNR" column shows it at the start and the end. "layers promoted" counts the
promotions kept after the minimising pass; "quantizations" is every model quantized on
the way (each a full calibration). Prints the machine load; not collected by pytest.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import List

import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402  (the sibling script)
from pyquant import quantize  # noqa: E402
from pyquant.analysis import PrecisionTarget, auto_mixed_precision  # noqa: E402
from pyquant.config import get_preset  # noqa: E402

CONFIGS = {
    "xint8": ("XINT8", get_preset("XINT8")),
    "u8s8_pc": ("U8S8 per-channel", dataclasses.replace(get_preset("U8S8"), per_channel=True)),
    "u8s8": ("U8S8", get_preset("U8S8")),
    "a8w8": ("A8W8", get_preset("A8W8")),
}
# The weak spots named in the issue first; every other corpus model under XINT8.
DEFAULT_ROWS = [("minilm", "xint8"), ("yolov8n", "u8s8_pc"), ("magika", "xint8")]
MESSAGE_CHARS = 160


def session(model: onnx.ModelProto):
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 2, 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def held_out_feeds(task: corpus.Task) -> tuple:
    """(feeds the SQNR target is measured on, whether they are really held out)."""
    if isinstance(task, corpus.FeedTask):
        return task._feeds(corpus.HELD_OUT), True  # noqa: SLF001 (the task's own held-out batches)
    return task.calibration(), False


def short(name: str) -> str:
    return name if len(name) <= 48 else "..." + name[-45:]


def run_row(name: str, key: str, args) -> List[str]:
    label, config = CONFIGS[key]
    path = corpus.fetch([name])[name]
    task = corpus.get(name).task(path)
    feeds = task.calibration()
    ref = task.run(corpus.float_session(path))
    float_metric = task.score(ref, ref).value

    def evaluate(model: onnx.ModelProto):
        test = task.run(session(model))
        return task.score(ref, test), corpus.sqnr_db(ref, test)

    def metric(model: onnx.ModelProto) -> float:
        return evaluate(model)[0].value

    held_out, really = held_out_feeds(task)
    target = PrecisionTarget(min_sqnr_db=args.sqnr, max_metric_drop=args.metric_drop * abs(float_metric),
                             evaluator=metric, allow_float=args.allow_float, require_all=False)
    start = time.perf_counter()
    result = auto_mixed_precision(str(path), feeds, config, target, held_out, held_out_samples=args.held_out_samples,
                                  max_trials=args.max_trials)
    seconds = time.perf_counter() - start
    start_score, start_sqnr = evaluate(quantize(str(path), feeds, config))
    final_score, final_sqnr = evaluate(result.model)
    promoted = "; ".join(f"{p.kind} {short(p.layer)}" for p in result.promotions) or "-"
    search_sqnr = f"{result.start.sqnr_db:.1f} -> {result.final.sqnr_db:.1f}" + ("" if really else " (calib)")
    return [name, label, f"{start_sqnr:.1f}", start_score.text, f"{final_sqnr:.1f}", final_score.text,
            f"{float_metric:.4f}", search_sqnr,
            "yes" if result.met else "no", str(len(result.promotions)), promoted, str(len(result.tried)),
            str(result.quantizations), f"{seconds:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=None,
                        help="model:config pairs, comma-separated (default: " +
                             ",".join(f"{m}:{c}" for m, c in DEFAULT_ROWS) + " then the other models under xint8)")
    parser.add_argument("--models", default=None, help="comma-separated corpus models, each under --configs")
    parser.add_argument("--configs", default="xint8", help=f"with --models: from {','.join(CONFIGS)}")
    parser.add_argument("--sqnr", type=float, default=25.0, help="target output SQNR to float, dB")
    parser.add_argument("--metric-drop", type=float, default=0.01, help="target: task metric within this fraction")
    parser.add_argument("--held-out-samples", type=int, default=64, help="samples the SQNR target and the "
                                                                          "sensitivity variants run on")
    parser.add_argument("--max-trials", type=int, default=30, help="promotions tried per model at most")
    parser.add_argument("--allow-float", action="store_true", help="promote to float instead of 16-bit activations")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, stream=sys.stderr,
                        format="%(name)s: %(message)s")
    if args.rows:
        rows = [tuple(r.split(":")) for r in args.rows.split(",")]
    elif args.models:
        rows = [(m, c) for m in args.models.split(",") for c in args.configs.split(",")]
    else:
        rows = DEFAULT_ROWS + [(m.name, "xint8") for m in corpus.MODELS if m.name not in {r[0] for r in DEFAULT_ROWS}]
    unknown = [c for _, c in rows if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; valid: {', '.join(CONFIGS)}")
    started = time.perf_counter()
    print(f"machine load at start (1/5/15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())} on "
          f"{os.cpu_count()} CPUs; onnxruntime {ort.__version__}; target: SQNR >= {args.sqnr:g} dB or task metric "
          f"within {args.metric_drop:.0%} of float; promotions to {'float' if args.allow_float else 'int16 activations'}",
          flush=True)
    print("\n| model | preset | SQNR dB before | task metric before | SQNR dB after | task metric after | "
          "float metric | search SQNR dB (first held-out samples) | target met | layers promoted | promoted | "
          "promotions tried | quantizations | seconds | failure |")
    print("|---" * 15 + "|", flush=True)
    for name, key in rows:
        print(f"[{name} x {key}]", file=sys.stderr, flush=True)
        try:
            cells = run_row(name, key, args) + [""]
        except Exception as e:  # noqa: BLE001  (a row reports its failure; the run goes on)
            logging.debug("%s", traceback.format_exc())
            lines = str(e).strip().splitlines()
            cells = [name, CONFIGS[key][0]] + [""] * 12 + [f"{type(e).__name__}: {(lines or [''])[0][:MESSAGE_CHARS]}"]
        print("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |", flush=True)
    print(f"\nmachine load at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
