"""Speed of the fast finetune inner loop (pyquant.kernels.fit_rounding) on layers of
EfficientNet-Lite0's shapes, against numpy doing the same Gram products (matmul of the
weights with the Gram matrix, once per iteration) in the same process. Prints one
markdown table. Not collected by pytest.

    python benchmarks/fit_rounding.py [--iterations 600] [--repeats 3] [--isa LEVEL] [--threads N] [--settle 0.3]

The ratio "fit / numpy products" is the kernel's whole Adam loop (soft rounding, products,
gradient, regulariser, update) over numpy's bare products: below 1, the C++ loop costs
less than its products alone would in numpy.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from pyquant import kernels

# (name, groups, rows, K): pointwise convolutions and the classifier of Lite0, a depthwise 5x5
LAYERS = [
    ("1x1 1152 -> 192", 1, 192, 1152),
    ("1x1 320 -> 1280", 1, 1280, 320),
    ("1x1 80 -> 480", 1, 480, 80),
    ("classifier 1280 -> 1000", 1, 1000, 1280),
    ("depthwise 5x5, 672 channels", 672, 1, 25),
]


def problem(groups: int, rows: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(groups, 4 * k, k)).astype(np.float32)
    gram = np.einsum("gmi,gmj->gij", x, x) / (4 * k)
    w = rng.normal(scale=0.05, size=(groups, rows, k)).astype(np.float32)
    scale = np.abs(w).max(axis=2) / 127
    target = np.einsum("grk,gkj->grj", w, gram)
    return w, scale, gram.astype(np.float32), target.astype(np.float32)


def best_of(repeats: int, fn, settle: float = 0.0) -> float:
    times = []
    for _ in range(repeats):
        # OpenBLAS's worker threads spin for about 0.1 s after a product: timed at once, the
        # next call would share the cores with them (the fit ran 18.5-23.1 ms on 1x1 80 -> 480
        # after a pause, 24.7-29.0 ms right after numpy's products). Both sides get the pause.
        time.sleep(settle)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--isa", choices=kernels.supported_isas(), help="force an ISA level (default: the best)")
    parser.add_argument("--threads", type=int, help="kernel threads (default: the CPUs of the affinity mask)")
    parser.add_argument("--settle", type=float, default=0.3,
                        help="seconds of pause before each timed call, so that no thread of the previous call "
                             "still spins (default 0.3)")
    args = parser.parse_args()
    if args.isa:
        kernels.set_isa(args.isa)
    if args.threads:
        kernels.set_num_threads(args.threads)
    print(f"ISA level {kernels.isa()}, {kernels.get_num_threads()} kernel threads, {args.settle} s pause before "
          f"each timed call, load average {os.getloadavg()[0]:.1f} at the start\n")
    print(f"| layer | fit_rounding s ({args.iterations} iterations) | numpy products s | fit / numpy products |")
    print("|---|---|---|---|")
    for name, groups, rows, k in LAYERS:
        w, scale, gram, target = problem(groups, rows, k)
        fit = best_of(args.repeats, lambda: kernels.fit_rounding(w, scale, gram, target, -128, 127,
                                                                  iterations=args.iterations), args.settle)

        def products() -> None:
            for _ in range(args.iterations):
                np.matmul(w, gram)

        ref = best_of(args.repeats, products, args.settle)
        print(f"| {name} | {fit:.3f} | {ref:.3f} | {fit / ref:.2f} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
