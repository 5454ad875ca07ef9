"""The calibration histogram kernel against numpy, in the same process.

pyquant's collector needs, per activation tensor and batch, the range (min/max, NaN/Inf
count) and a 2048-bin histogram. The kernel does both in one pass
(pyquant.kernels.histogram_accumulate_if_in_range); the numpy baseline is
np.histogram plus np.min/np.max (and np.isfinite, without which np.histogram would fail
on a NaN). Tensors have EfficientNet-Lite0's shapes at batch 8; each time is the best of
``--repeat`` runs.

    python benchmarks/histogram.py [--isa avx512|avx2|baseline] [--threads N]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from pyquant import kernels, reference

BINS = 2048


def cases(rng: np.random.Generator):
    """(description, array, lo, hi): activation-like tensors."""
    relu6 = np.clip(rng.standard_normal((8, 32, 112, 112), dtype=np.float32) * 2, 0, 6)  # half zeros
    yield "ReLU6 output 8x32x112x112 (half zeros)", relu6, 0.0, 6.0
    wide = rng.standard_normal((8, 192, 28, 28), dtype=np.float32) * np.float32(3)
    yield "signed 8x192x28x28 (project conv)", wide, float(wide.min()), float(wide.max())
    head = np.abs(rng.standard_normal((8, 1280, 7, 7), dtype=np.float32))
    yield "head 8x1280x7x7", head, 0.0, float(head.max())
    tail = rng.standard_t(2, (8, 112, 14, 14)).astype(np.float32)  # heavy tails: a huge range
    yield "heavy-tailed 8x112x14x14", tail, float(tail.min()), float(tail.max())


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--isa", choices=kernels.supported_isas(), help="force an ISA level (default: the best)")
    parser.add_argument("--threads", type=int, help="kernel threads (default: the CPUs of the affinity mask)")
    args = parser.parse_args()
    if args.isa:
        kernels.set_isa(args.isa)
    if args.threads:
        kernels.set_num_threads(args.threads)
    print(f"ISA level {kernels.isa()}, {kernels.get_num_threads()} kernel threads\n")
    rng = np.random.default_rng(0)
    print("| tensor | elements | pyquant ms | numpy ms | numpy / pyquant |")
    print("|---|---|---|---|---|")
    for name, x, lo, hi in cases(rng):
        hist = np.zeros(BINS)

        def ours():
            kernels.histogram_accumulate_if_in_range(x, hist, lo, hi)

        def numpy_baseline():
            finite = np.isfinite(x).all()
            np.min(x), np.max(x)
            if finite:
                np.histogram(x, BINS, (lo, hi))

        # before timing: equal to pyquant.reference (the kernel's float32 binning in numpy),
        # and within float32 rounding of a bin edge of np.histogram (float64 edges)
        hist[:] = 0
        ours()
        expected = np.zeros(BINS)
        reference.histogram_accumulate(x, expected, lo, hi)
        assert np.array_equal(hist, expected), f"{name}: the kernel differs from pyquant.reference"
        moved = np.abs(hist - np.histogram(x, BINS, (lo, hi))[0]).sum() / 2
        assert moved <= 1e-4 * x.size, f"{name}: {moved} values in other bins than np.histogram's"
        t_ours = best_time(ours, args.repeat)
        t_numpy = best_time(numpy_baseline, max(2, args.repeat // 2))
        print(f"| {name} | {x.size} | {1e3 * t_ours:.1f} | {1e3 * t_numpy:.1f} | {t_numpy / t_ours:.1f} |")


if __name__ == "__main__":
    main()
