"""Two quantizer configurations on YOLOv8n, compared photo by photo: detection F1 against the
float model's boxes for each (benchmarks/corpus.py's Yolo task and matching), each with its
95 % bootstrap interval, and the paired difference (second minus first) with its interval
from the same resamples of photos. A difference of 0.02 hides inside two overlapping
intervals of +-0.03 when the rows are read apart, and shows when they are compared on the
same draws.

    python benchmarks/detection_paired.py [--configs u8s8_pc_clipped,u8s8_pc]
        [--photos held_out|calib_unused] [--confidence 0.2,0.25,0.3]

--configs: two keys of benchmarks/real_models.py's CONFIGS. --photos: held_out, the 500 val
photos real_models.py scores; calib_unused, the calibration folder's photos that
calibration does not use (436 of 500: disjoint from both the calibration photos and the val
photos, so from whatever was tuned on those). Every confidence threshold is scored on the
same quantized models. Needs the corpus cache and ../shared (as benchmarks/corpus.py). Not
collected by pytest.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402  (the sibling scripts)
import real_models  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="u8s8_pc_clipped,u8s8_pc",
                        help=f"two of {','.join(real_models.CONFIGS)}")
    parser.add_argument("--photos", default=corpus.HELD_OUT, choices=[corpus.HELD_OUT, corpus.CALIB_UNUSED])
    parser.add_argument("--confidence", default="0.2,0.25,0.3", help="comma-separated score thresholds")
    args = parser.parse_args()
    keys = [k for k in args.configs.split(",") if k]
    if len(keys) != 2 or any(k not in real_models.CONFIGS for k in keys):
        parser.error(f"--configs takes two of {', '.join(real_models.CONFIGS)}; got {args.configs!r}")
    thresholds = [float(t) for t in args.confidence.split(",") if t]

    print(f"machine load at start (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs")
    path = corpus.fetch(["yolov8n"])["yolov8n"]
    task = corpus.Yolo(path)
    photos = task.photos(args.photos)
    feeds = task.feeds(args.photos)
    calibration = task.calibration()
    float_outputs = corpus.run_feeds(corpus.float_session(path), feeds)
    outputs = {}
    for key in keys:
        model, _ = real_models.CONFIGS[key].make()(path, calibration)
        outputs[key] = corpus.run_feeds(real_models.session(model), feeds)

    picks = corpus.bootstrap_picks(len(photos))
    print(f"\nYOLOv8n, {len(photos)} photos ({args.photos}), {len(calibration)} calibration photos; "
          f"first = {real_models.CONFIGS[keys[0]].label}; second = {real_models.CONFIGS[keys[1]].label}\n")
    print("| confidence | float boxes | F1 first [95 %] | F1 second [95 %] | second - first [95 %, paired] "
          "| resamples with second > first |")
    print("|---|---|---|---|---|---|")
    for threshold in thresholds:
        task.CONF = threshold
        ref = [task.decode(call[0]) for call in float_outputs]
        f1s: List[float] = []
        draws: List[np.ndarray] = []
        for key in keys:
            matched, total, _ = corpus.detection_matches(ref, [task.decode(call[0]) for call in outputs[key]])
            f1s.append(corpus.f1_from_matches(matched, total))
            draws.append(corpus.bootstrap_f1(matched, total, picks))
        cells = [f"{f1:.3f} [{lo:.3f}, {hi:.3f}]" for f1, (lo, hi) in
                 zip(f1s, (np.percentile(d, [2.5, 97.5]) for d in draws))]
        lo, hi = np.percentile(draws[1] - draws[0], [2.5, 97.5])
        print(f"| {threshold:g} | {sum(len(r.boxes) for r in ref)} | {cells[0]} | {cells[1]} "
              f"| {f1s[1] - f1s[0]:+.3f} [{lo:+.3f}, {hi:+.3f}] | {np.mean(draws[1] > draws[0]):.3f} |")
    print(f"\nmachine load at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
