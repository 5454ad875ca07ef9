"""Speed of the window Gram kernel (pyquant.kernels.window_gram, fast finetune's Gram
accumulation for convolutions with a window) on EfficientNet-Lite0's depthwise layers and
stem at batch 8, against numpy (OpenBLAS) doing only the Gram products P^T P of the same
patches (im2col made beforehand, not timed), in the same process. Prints one markdown
table and the load average. Not collected by pytest.

    python benchmarks/window_gram.py [--repeats 5] [--isa LEVEL] [--threads N] [--cpu-time]

With ``--cpu-time`` the times are the process's CPU time (all threads), which a busy
machine disturbs less than wall time; use it with ``--threads 1`` (numpy's BLAS then runs
on one thread too). The ratio "kernel / numpy products" is the kernel's whole work (patches from NCHW, the
upper triangle of every group's Gram in the fixed float32 order, float64 sums) over numpy's
bare batched matmul of the prepared patches.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from pyquant import kernels, reference, threads

# (name, n, channels, h, w, groups, kernel, stride, pad)
LAYERS = [
    ("stem 3x3 s2, 3 -> 32, 224x224", 8, 3, 224, 224, 1, 3, 2, 1),
    ("depthwise 3x3, 32 ch, 112x112", 8, 32, 112, 112, 32, 3, 1, 1),
    ("depthwise 5x5 s2, 144 ch, 56x56", 8, 144, 56, 56, 144, 5, 2, 2),
    ("depthwise 5x5, 672 ch, 14x14", 8, 672, 14, 14, 672, 5, 1, 2),
    ("depthwise 5x5, 1152 ch, 7x7", 8, 1152, 7, 7, 1152, 5, 1, 2),
]


def best_of(repeats: int, fn, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--isa", choices=kernels.supported_isas(), help="force an ISA level (default: the best)")
    parser.add_argument("--threads", type=int, help="kernel threads (default: the CPUs of the affinity mask)")
    parser.add_argument("--cpu-time", action="store_true", help="time by process CPU time, not wall time")
    args = parser.parse_args()
    if args.isa:
        kernels.set_isa(args.isa)
    if args.threads:
        kernels.set_num_threads(args.threads)
        if args.threads == 1 and getattr(threads, "set_blas_threads", None):
            threads.set_blas_threads(1)
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(f"ISA level {kernels.isa()}, {kernels.get_num_threads()} kernel threads, "
          f"{'CPU' if args.cpu_time else 'wall'} time, load average {os.getloadavg()[0]:.2f}\n")
    print("| layer | window_gram ms | numpy products ms | kernel / numpy products |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name, n, c, h, w, groups, k, stride, pad in LAYERS:
        x = np.maximum(rng.standard_normal((n, c, h, w)), 0).astype(np.float32)
        geo = ((k, k), (stride, stride), (1, 1), (pad,) * 4)
        kk = c // groups * k * k
        empty3, empty2 = np.zeros((0, 0, 0)), np.zeros((0, 0))

        def kernel() -> None:
            kernels.window_gram(x, None, groups, *geo, np.zeros((groups, kk, kk)), empty3, empty3,
                                np.zeros((groups, kk)), empty2)

        patches = reference.im2col(x, groups, *geo).astype(np.float32)  # [groups, positions, K]
        ours = best_of(args.repeats, kernel, clock)
        ref = best_of(args.repeats, lambda: np.matmul(patches.transpose(0, 2, 1), patches), clock)
        print(f"| {name} | {1e3 * ours:.1f} | {1e3 * ref:.1f} | {ours / ref:.2f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
