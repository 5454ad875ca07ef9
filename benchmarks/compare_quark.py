"""pyquant beside the reference tool (AMD Quark) on EfficientNet-Lite0 and the ImageNet
sample in ../shared, in one run, with one evaluation. Prints one markdown table.

amd-quark pins its own onnx, so it lives in its own environment, never in pyquant's:

    python -m venv /tmp/quarkvenv
    /tmp/quarkvenv/bin/pip install torch==2.13.0     # first: the CPU build on this disk
    /tmp/quarkvenv/bin/pip install amd-quark onnxruntime pillow
    python benchmarks/compare_quark.py --quark-python /tmp/quarkvenv/bin/python

Quark runs in a subprocess (benchmarks/quark_worker.py, its own peak RSS); pyquant rows
reuse benchmarks/imagenet_sample.py's workers. `--slow` adds Quark's AdaRound configs
(about 20 minutes each here) and pyquant's fast finetune rows. Each pyquant row's time is
divided by its Quark counterpart's from the same run (COUNTERPART). `--quark-rows` and
`--pyquant-rows` pick rows, e.g. the README's INT8_CLE table:

    python benchmarks/compare_quark.py --quark-python /tmp/quarkvenv/bin/python \
        --quark-rows INT8_CLE --pyquant-rows int8_cle

Columns: configuration, top-1 %, top-5 %, top-1 agreement with float %, KL to float, size
MB, quantize s, time / Quark counterpart, peak RSS MB (as imagenet_sample.py's table, with
the time ratio in place of x floor and finetune s). The load average before and after the
run goes to stderr: times are only comparable between runs on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import imagenet_sample  # noqa: E402  (the pyquant rows and the evaluation)

QUARK_ROWS = {
    "XINT8": "Quark XINT8 (its default config includes CLE)",
    "XINT8_NO_CLE": "Quark XINT8 with include_cle=False",
    "INT8_CLE": "Quark INT8_CLE",
}
QUARK_SLOW_ROWS = {
    "XINT8_ADAROUND": "Quark XINT8_ADAROUND",
    "INT8_CNN_ACCURATE": "Quark INT8_CNN_ACCURATE",
}
PYQUANT_ROWS = ["xint8", "int8_cle"]
PYQUANT_SLOW_ROWS = ["xint8_ft", "int8_cnn_accurate"]
# pyquant row -> the Quark config it is timed against ("time / Quark counterpart")
COUNTERPART = {"xint8": "XINT8_NO_CLE", "int8_cle": "INT8_CLE", "xint8_ft": "XINT8_ADAROUND",
               "int8_cnn_accurate": "INT8_CNN_ACCURATE"}


def run_quark(python: str, name: str, shared: Path, model: Path, out: Path) -> dict:
    shared, model, out = shared.resolve(), model.resolve(), out.resolve()  # it runs in out's folder
    proc = subprocess.run([python, str(HERE / "quark_worker.py"), "--model", str(model), "--out", str(out),
                           "--calib", str(shared / "data/imagenet-sample/calib"), "--config", name],
                          capture_output=True, text=True, cwd=out.parent)  # Quark writes quantized_info.csv to its cwd
    if proc.returncode != 0:
        raise RuntimeError(f"Quark {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=imagenet_sample.REPO.parent / "shared")
    parser.add_argument("--quark-python", default=None, help="Python of an environment with amd-quark")
    parser.add_argument("--slow", action="store_true", help="also Quark's AdaRound configs")
    parser.add_argument("--quark-rows", default=None,
                        help=f"comma-separated subset of Quark configs (default: all of {', '.join(QUARK_ROWS)}, "
                             f"with --slow also {', '.join(QUARK_SLOW_ROWS)})")
    parser.add_argument("--pyquant-rows", default=None, help="comma-separated subset of pyquant rows")
    args = parser.parse_args()
    if not args.quark_python:
        parser.error("--quark-python is required (see the module docstring for how to install amd-quark)")
    from pyquant.evaluation import evaluate

    model = args.shared / "models" / "efficientnet_lite0.onnx"
    quark_rows = dict(QUARK_ROWS, **(QUARK_SLOW_ROWS if args.slow else {}))
    if args.quark_rows:
        every = dict(QUARK_ROWS, **QUARK_SLOW_ROWS)
        names = [n for n in args.quark_rows.split(",") if n]
        if unknown := [n for n in names if n not in every]:
            parser.error(f"unknown Quark rows {unknown}; valid: {', '.join(every)}")
        quark_rows = {name: every[name] for name in names}
    pyquant_rows = PYQUANT_ROWS + (PYQUANT_SLOW_ROWS if args.slow else [])
    if args.pyquant_rows:
        pyquant_rows = [n for n in args.pyquant_rows.split(",") if n and n != "float"]  # float always runs
        if unknown := [n for n in pyquant_rows if n not in imagenet_sample.ROWS or n == "floor"]:
            valid = [n for n in imagenet_sample.ROWS if n not in ("float", "floor")]
            parser.error(f"unknown pyquant rows {unknown}; valid: {', '.join(valid)}")
    print(f"load average (1, 5, 15 min) before: {os.getloadavg()}", file=sys.stderr)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["float"] + pyquant_rows:
            results[imagenet_sample.ROWS[name]] = dict(imagenet_sample.run_worker(name, args.shared, Path(tmp)),
                                                       counterpart=COUNTERPART.get(name))
            print(f"done: {name}", file=sys.stderr)
        for name, label in quark_rows.items():
            out = Path(tmp) / f"quark_{name}.onnx"
            r = run_quark(args.quark_python, name, args.shared, model, out)
            ev = evaluate(out, imagenet_sample.reader(args.shared, "val", batch_size=25), keep_logits=True)
            r.update(top1=ev.top1, top5=ev.top5, size_mb=ev.size_mb, predictions=ev.predictions.tolist(),
                     logits=ev.logits)
            results[label] = r
            print(f"done: Quark {name}", file=sys.stderr)
    print(f"load average (1, 5, 15 min) after: {os.getloadavg()}", file=sys.stderr)
    float_result = results[imagenet_sample.ROWS["float"]]
    float_pred = float_result["predictions"]
    print("| configuration | top-1 % | top-5 % | top-1 agreement with float % | KL to float | size MB | quantize s "
          "| time / Quark counterpart | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        agree = 100 * sum(a == b for a, b in zip(r["predictions"], float_pred)) / len(float_pred)
        secs = f"{r['seconds']:.1f}" if "seconds" in r else ""
        other = results.get(quark_rows.get(r.get("counterpart") or "", ""))
        ratio = f"{r['seconds'] / other['seconds']:.3f} ({r['counterpart']})" if other and "seconds" in r else ""
        rss = f"{r['rss']:.0f}" if "seconds" in r else ""
        kl = imagenet_sample.kl_to_float(r, float_result)
        print(f"| {label} | {100 * r['top1']:.1f} | {100 * r['top5']:.1f} | {agree:.1f} | {kl} | {r['size_mb']:.2f} "
              f"| {secs} | {ratio} | {rss} |")


if __name__ == "__main__":
    main()
