"""XINT8 quantization of EfficientNet-Lite0 (500 calibration images from ../shared) on a
quiet machine and beside CPU-bound competing processes, in one run. Prints one markdown
table: quiet seconds, loaded seconds and their ratio, per pyquant build.

    python benchmarks/contention.py [--shared ../shared] [--hogs 2] [--repeats 3]
                                    [--baseline-python OTHER_VENV/bin/python]

Each quantization runs in a fresh subprocess (the pyquant of ``--python``, default this
interpreter; ``--baseline-python`` adds the rows of another installation, e.g. an older
commit, measured in the same run). A hog is ``python -c 'while True: pass'``; with
``--hogs 2`` on 2 cores a fair share is half the machine, so 2x the quiet time. The time
is the quantization alone (model loading and imports excluded); the median of
``--repeats`` runs is shown. Not collected by pytest.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

JOB = r"""
import json, sys, time
import pyquant
from pyquant.data import ImageFolderReader, Preprocess
from pyquant.graph.model_io import load_model
shared, threads = sys.argv[1], sys.argv[2]
model = load_model(shared + "/models/efficientnet_lite0.onnx")
reader = ImageFolderReader(shared + "/data/imagenet-sample/calib", "input",
                           Preprocess(224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), 8)
kwargs = {} if threads == "default" else {"threads": int(threads)}
start = time.perf_counter()
pyquant.quantize(model, reader, "XINT8", **kwargs)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def run_job(python: str, shared: Path, threads: str) -> float:
    out = subprocess.run([python, "-c", JOB, str(shared), threads], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{python}: quantization failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def start_hogs(count: int) -> List[subprocess.Popen]:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    time.sleep(1.0)  # let the scheduler see them as CPU-bound
    return hogs


def stop_hogs(hogs: List[subprocess.Popen]) -> None:
    for hog in hogs:
        hog.kill()
        hog.wait()


def measure(python: str, shared: Path, hogs: int, repeats: int, threads: str) -> dict:
    quiet = [run_job(python, shared, threads) for _ in range(repeats)]
    running = start_hogs(hogs)
    try:
        loaded = [run_job(python, shared, threads) for _ in range(repeats)]
    finally:
        stop_hogs(running)
    return {"quiet": statistics.median(quiet), "loaded": statistics.median(loaded), "quiet_all": quiet,
            "loaded_all": loaded}


def version_of(python: str) -> str:
    out = subprocess.run([python, "-c", "import pyquant, os; print(os.path.dirname(pyquant.__file__))"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose pyquant is measured")
    parser.add_argument("--baseline-python", default=None, help="another installation, measured in the same run")
    parser.add_argument("--hogs", type=int, default=2, help="CPU-bound competing processes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="default", help="pyquant thread budget ('default': affinity CPUs)")
    args = parser.parse_args(argv)
    shared = args.shared.resolve()
    print(f"machine: {os.cpu_count()} CPUs, affinity {len(os.sched_getaffinity(0))}; load average before the run "
          f"{os.getloadavg()[0]:.2f}; hogs: {args.hogs}; repeats: {args.repeats} (median shown)", file=sys.stderr)
    rows = []
    for label, python, threads in (("pyquant (this build)", args.python, args.threads),
                                   ("baseline", args.baseline_python, "default")):
        if python is None:
            continue
        result = measure(python, shared, args.hogs, args.repeats,
                         threads if label.startswith("pyquant") else "default")
        print(f"{label} ({version_of(python)}): quiet {result['quiet_all']}, loaded {result['loaded_all']}",
              file=sys.stderr)
        rows.append((label, result))
    print(f"\n| build | quiet s | with {args.hogs} CPU hogs s | loaded / quiet |")
    print("|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['quiet']:.1f} | {r['loaded']:.1f} | {r['loaded'] / r['quiet']:.2f} |")
    if len(rows) == 2:
        print(f"\nquiet time of this build / baseline: {rows[0][1]['quiet'] / rows[1][1]['quiet']:.3f}")


if __name__ == "__main__":
    main()
