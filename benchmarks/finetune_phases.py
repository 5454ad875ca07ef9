"""Where fast finetune's time goes on EfficientNet-Lite0 with the ImageNet sample in
../shared: the QDQ model's inference pass, the Gram accumulation and the fits (the
per-layer AdaRound loops with their numpy set-up), as FastFinetuneReport records them.
Prints one markdown table. Not collected by pytest.

    python benchmarks/finetune_phases.py [--shared ../shared] [--rows xint8_ft,int8_cnn_accurate]

To compare two builds, run it with each installation's python one after the other: the
machine's load average is printed with every row, and only ratios measured at similar
loads mean anything on a shared machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

from imagenet_sample import reader

from pyquant.config import FastFinetuneOptions, get_preset
from pyquant.graph.model_io import load_model
from pyquant.pipeline import quantize_model

REPO = Path(__file__).resolve().parents[1]
# row -> (preset, the fields it replaces), as in benchmarks/imagenet_sample.py
ROWS = {
    "xint8_ft": ("XINT8", {"fast_finetune": FastFinetuneOptions()}),
    "int8_cnn_accurate": ("INT8_CNN_ACCURATE", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--rows", default="xint8_ft,int8_cnn_accurate")
    args = parser.parse_args()
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {sorted(ROWS)}")
    print("| row | iterations | quantize s | finetune inference s | Gram s | fit s | load before | load after |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        preset, fields = ROWS[row]
        config = dataclasses.replace(get_preset(preset), **fields)
        load = os.getloadavg()[0]
        start = time.perf_counter()
        result = quantize_model(load_model(args.shared / "models/efficientnet_lite0.onnx"), reader(args.shared, "calib"),
                                config)
        seconds = time.perf_counter() - start
        ft = result.reports["fast_finetune"]
        print(f"| {row} | {config.fast_finetune.iterations} | {seconds:.1f} | {ft.seconds_inference:.1f} | "
              f"{ft.seconds_gram:.1f} | {ft.seconds_fit:.1f} | {load:.1f} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
