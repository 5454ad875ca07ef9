"""One thread against two for each threaded kernel, at work sizes from 1e3 to 1e7, in one
process: where does the second thread start to pay? Prints one markdown table per kernel
and a summary with each crossover: the smallest size from which two threads are faster by
at least 10 % at every larger size measured. The crossovers are the single-thread
thresholds in csrc/kernels/*.cc (the k...MinParallel constants); each kernel's size is in
the units of its threshold (elements, bins x candidates, multiply-adds).

    python benchmarks/kernel_threads.py [--repeat 5] [--rounds 3] [--under-load [--hogs 1]]

Times are the best of --repeat runs (each run long enough to time, at least 2 ms), one and
two threads interleaved so that both see the same machine, and the best over --rounds
sweeps of all kernels (on a shared machine a sweep can fall in another process's busy
spell). The thresholds are switched off while measuring, so that small inputs really run
on two threads.

--under-load runs CPU hogs (busy Python loops) on the same CPUs and times the 2048-bin
histogram of a 175,616-element tensor (EfficientNet-Lite0's heavy-tailed 8x112x14x14) with
one and two threads: mean, median and 90th percentile of 300 calls. Run it once more with
OMP_WAIT_POLICY=ACTIVE in the environment for the behaviour before pyquant.kernels set
PASSIVE (OpenMP threads spinning while they wait). Not collected by pytest.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List, Tuple

import numpy as np

from pyquant import _kernels, kernels

SIZES = [1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000, 10_000_000]
# Two threads must beat one by this factor to count as faster.
MARGIN = 1.1
MIN_RUN_SECONDS = 2e-3


def _range_stats(size: int) -> Callable[[], object]:
    x = np.random.default_rng(0).standard_normal(size).astype(np.float32)
    return lambda: kernels.range_stats(x)


def _histogram(size: int) -> Callable[[], object]:
    x = np.random.default_rng(0).standard_t(2, size).astype(np.float32)
    hist, lo, hi = np.zeros(2048), float(x.min()), float(x.max())
    return lambda: kernels.histogram_accumulate_if_in_range(x, hist, lo, hi)


def _channel_sums(size: int) -> Callable[[], object]:
    x = np.random.default_rng(0).standard_normal((8, 64, max(1, size // 512))).astype(np.float32)
    sums = np.zeros(64)
    return lambda: kernels.channel_sums(x, sums)


def _histogram_quant_errors(size: int) -> Callable[[], object]:
    nbins = min(2048, size)
    hist = np.random.default_rng(0).random(nbins)
    scales = np.geomspace(1e-3, 1.0, max(1, size // nbins))
    return lambda: kernels.histogram_quant_errors(hist, -3.0, 3.0, scales, 0.0, -128, 127)


def _tensor_quant_errors(size: int) -> Callable[[], object]:
    x = np.random.default_rng(0).standard_normal((8, max(1, size // 128))).astype(np.float32)
    scales = np.geomspace(1e-3, 1.0, 16)
    return lambda: kernels.tensor_quant_errors(x, scales, 0.0, -128, 127)


def _entropy(size: int) -> Callable[[], object]:
    # work = candidates x bins = (nbins - 127) * nbins with 128 quantization bins
    nbins = int((127 + np.sqrt(127 ** 2 + 4 * size)) / 2)
    hist = np.abs(np.random.default_rng(0).standard_normal(nbins)) * 100
    return lambda: kernels.histogram_entropy_threshold(hist, 6.0, 128)


def _fit_rounding(size: int) -> Callable[[], object]:
    # work = rows * k^2 * iterations with k = 16 (already a multiple of the padding) and 4 iterations
    k, iterations = 16, 4
    rows = max(1, size // (k * k * iterations))
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((1, rows, k)) * 0.3).astype(np.float32)
    gram = np.eye(k, dtype=np.float32)[None]
    scale = np.full((1, rows), 0.01, np.float32)
    return lambda: kernels.fit_rounding(w, scale, gram, w, -128, 127, iterations=iterations)


def _gram_product(size: int) -> Callable[[], object]:
    k = 64  # work = rows * k^2
    x = np.random.default_rng(0).standard_normal((max(1, size // (k * k)), k)).astype(np.float32)
    gram = np.eye(k, dtype=np.float32)
    return lambda: kernels.gram_product(x, gram)


def _window_gram(groups: int, channels: int, images: int) -> Callable[[int], Callable[[], object]]:
    """work = images * groups * K^2 * positions for a 3x3 window (K = channels / groups * 9)."""
    def make(size: int) -> Callable[[], object]:
        k = channels // groups * 9
        side = max(1, int(np.sqrt(size / (images * groups * k * k))))
        q = np.random.default_rng(0).standard_normal((images, channels, side, side)).astype(np.float32)
        acc = [np.zeros((groups, k, k)), np.zeros((0, 0, 0)), np.zeros((0, 0, 0)), np.zeros((groups, k)),
               np.zeros((0, 0))]
        return lambda: kernels.window_gram(q, None, groups, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), *acc)
    return make


# (kernel, the threshold constant it sets, setup for a size)
KERNELS: List[Tuple[str, str, Callable[[int], Callable[[], object]]]] = [
    ("range_stats", "kRangeMinParallel (histogram.cc)", _range_stats),
    ("histogram_accumulate(_if_in_range), 2048 bins", "kHistogramMinParallel (histogram.cc)", _histogram),
    ("channel_sums", "kChannelSumsMinParallel (channel_stats.cc)", _channel_sums),
    ("histogram_quant_errors", "kHistogramErrorsMinParallel (scale_search.cc)", _histogram_quant_errors),
    ("tensor_quant_errors", "kTensorErrorsMinParallel (scale_search.cc)", _tensor_quant_errors),
    ("histogram_entropy_threshold", "kEntropyMinParallel (scale_search.cc)", _entropy),
    ("fit_rounding", "kFitRoundingMinParallel (rounding.cc)", _fit_rounding),
    ("gram_product", "kGramProductMinParallel (rounding.cc)", _gram_product),
    ("window_gram, depthwise (32 groups)", "kWindowGramGroupsMinParallel (window_gram.cc)", _window_gram(32, 32, 1)),
    ("window_gram, full conv (8 images)", "kWindowGramImagesMinParallel (window_gram.cc)", _window_gram(1, 3, 8)),
]


def time_once(fn: Callable[[], object]) -> float:
    """Seconds per call, over enough calls to last MIN_RUN_SECONDS."""
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= MIN_RUN_SECONDS:
            return elapsed / calls


def one_and_two(fn: Callable[[], object], threads: int, repeat: int) -> Tuple[float, float]:
    best = {1: float("inf"), threads: float("inf")}
    fn()  # warm up (pages, thread pool)
    for _ in range(repeat):
        for n in (1, threads):
            kernels.set_num_threads(n)
            best[n] = min(best[n], time_once(fn))
    return best[1], best[threads]


def crossover(rows: List[Tuple[int, float, float]]) -> int:
    """The smallest size from which two threads win by MARGIN at every larger size (0: never)."""
    found = 0
    for size, t1, t2 in reversed(rows):
        if t1 < MARGIN * t2:
            break
        found = size
    return found


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (Linux: /proc/stat), 0 elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def thresholds(args: argparse.Namespace) -> None:
    best: Dict[Tuple[str, int], List[float]] = {}
    wall, busy, own = time.perf_counter(), busy_seconds(), sum(os.times()[:2])
    _kernels._set_parallel_thresholds(False)
    try:
        for _ in range(args.rounds):
            for name, _, setup in KERNELS:
                for size in SIZES:
                    times = one_and_two(setup(size), args.threads, args.repeat)
                    old = best.setdefault((name, size), [float("inf")] * 2)
                    best[(name, size)] = [min(a, b) for a, b in zip(old, times)]
    finally:
        _kernels._set_parallel_thresholds(True)
    wall, others = time.perf_counter() - wall, busy_seconds() - busy - (sum(os.times()[:2]) - own)
    print(f"ISA level {kernels.isa()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; other processes kept "
          f"{max(others, 0.0) / wall:.2f} CPUs busy on average during the {wall:.0f} s of this sweep")
    summary = []
    for name, constant, _ in KERNELS:
        rows = [(size, *best[(name, size)]) for size in SIZES]
        print(f"\n{name}\n\n| size | 1 thread ms | {args.threads} threads ms | 1 / {args.threads} |\n|---|---|---|---|")
        for size, t1, t2 in rows:
            print(f"| {size:.0e} | {1e3 * t1:.4f} | {1e3 * t2:.4f} | {t1 / t2:.2f} |")
        summary.append((name, constant, crossover(rows)))
    print(f"\n| kernel | threshold constant | crossover ({args.threads} threads >= {MARGIN:.1f}x faster from here on) |")
    print("|---|---|---|")
    for name, constant, size in summary:
        print(f"| {name} | {constant} | {f'{size:.0e}' if size else 'never up to 1e7'} |")


@contextlib.contextmanager
def hogs(count: int, cpus: set) -> Iterator[None]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                              preexec_fn=lambda: os.sched_setaffinity(0, cpus)) for _ in range(count)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def histogram_calls(calls: int = 300) -> Dict[str, float]:
    x = np.random.default_rng(0).standard_t(2, (8, 112, 14, 14)).astype(np.float32)
    hist, lo, hi = np.zeros(2048), float(x.min()), float(x.max())
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        kernels.histogram_accumulate_if_in_range(x, hist, lo, hi)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"mean": float(np.mean(times)), "median": times[calls // 2], "p90": times[int(calls * 0.9)]}


def under_load(args: argparse.Namespace) -> None:
    cpus = set(range(args.threads)) & os.sched_getaffinity(0) or os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, CPUs {sorted(cpus)}, {args.hogs} hog(s); "
          "histogram of 175,616 values, 300 calls\n")
    print("| load | threads | mean ms | median ms | p90 ms |\n|---|---|---|---|---|")
    for load in ("idle", "hogs"):
        with hogs(args.hogs if load == "hogs" else 0, cpus):
            for label, n, forced in (("1", 1, False), (f"{args.threads}", args.threads, True),
                                     (f"{args.threads}, thresholds on", args.threads, False)):
                kernels.set_num_threads(n)
                _kernels._set_parallel_thresholds(not forced)
                try:
                    r = histogram_calls()
                finally:
                    _kernels._set_parallel_thresholds(True)
                print(f"| {load} | {label} | {1e3 * r['mean']:.3f} | {1e3 * r['median']:.3f} | {1e3 * r['p90']:.3f} |",
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="the many-thread side (default 2)")
    parser.add_argument("--under-load", action="store_true", help="the histogram beside CPU hogs instead")
    parser.add_argument("--hogs", type=int, default=1)
    args = parser.parse_args()
    before = kernels.get_num_threads()
    try:
        (under_load if args.under_load else thresholds)(args)
    finally:
        kernels.set_num_threads(before)


if __name__ == "__main__":
    main()
