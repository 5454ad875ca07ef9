"""Reproducibility of the kernels: the same inputs give the same bits with 1 and 2 threads
(every kernel's summation order is fixed by the data, not by the threads) and with each
x86-64 level's copy of the hot kernels (compiled without multiply-add contraction, and
fit_rounding's fused multiply-adds rounded once at every level, so that a vector width
changes no result)."""
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from pyquant import _kernels, kernels

RNG_SEED = 11


def _window_gram(groups, kernel=3, stride=1, dilation=1, pad=1, with_f=True, n=5, c=12, hw=(10, 9)):
    def run():
        rng = np.random.default_rng(RNG_SEED)
        q = rng.standard_normal((n, c) + hw).astype(np.float32)
        f = (q + 0.1 * rng.standard_normal(q.shape)).astype(np.float32) if with_f else None
        k = c // groups * kernel * kernel
        zeros = np.zeros
        acc = [zeros((groups, k, k)), zeros((groups, k, k) if with_f else (0, 0, 0)),
               zeros((groups, k, k) if with_f else (0, 0, 0)), zeros((groups, k)), zeros((groups, k) if with_f else (0, 0))]
        kernels.window_gram(q, f, groups, (kernel, kernel), (stride, stride), (dilation, dilation), (pad,) * 4, *acc)
        return acc
    return run


def _fit_rounding(groups, rows, k, algorithm, iterations=40, return_param=True):
    def run():
        rng = np.random.default_rng(RNG_SEED)
        x = rng.standard_normal((groups, 3 * k, k))
        gram = np.einsum("gnk,gnj->gkj", x, x) / (3 * k)
        w = rng.standard_normal((groups, rows, k)) * 0.3
        target = np.einsum("gkj,grj->grk", gram, w)
        scale = np.abs(w).max(axis=2) / 127 * 4
        lr = 0.1 if algorithm == kernels.RoundingAlgorithm.AdaRound else 1e-3
        fit = kernels.fit_rounding(w.astype(np.float32), scale.astype(np.float32), gram.astype(np.float32),
                                   target.astype(np.float32), -128, 127, algorithm=algorithm, iterations=iterations,
                                   learning_rate=lr, return_param=return_param)
        return [fit.q, fit.param] if return_param else [fit.q]
    return run


def _histogram(n, nbins=2048, dtype=np.float32):
    def run():
        x = np.random.default_rng(RNG_SEED).standard_t(2, n).astype(dtype)
        x[::97] = np.nan
        hist = np.zeros(nbins)
        kernels.histogram_accumulate(x, hist, -5.0, 7.0)
        s = kernels.range_stats(x)
        checked = np.zeros(nbins)
        added, s2 = kernels.histogram_accumulate_if_in_range(np.nan_to_num(x), checked, -1e9, 1e9)
        return [hist, checked, np.array([s.finite, s.nan, s.min, s.max, added, s2.min, s2.max])]
    return run


def _channel_sums(shape, dtype=np.float32):
    def run():
        x = (np.random.default_rng(RNG_SEED).standard_normal(shape) * 3 + 1).astype(dtype)
        sums = np.zeros(shape[1])
        kernels.channel_sums(x, sums)
        return [sums]
    return run


def _scale_search():
    rng = np.random.default_rng(RNG_SEED)
    hist = rng.random(2048) * 100
    x = rng.standard_normal((16, 4099)).astype(np.float32)

    def run():
        scales = np.geomspace(1e-3, 1.0, 200)
        return [kernels.histogram_quant_errors(hist, -3.0, 4.0, scales, 3.0, 0, 255),
                kernels.tensor_quant_errors(x, scales[:40], 0.0, -128, 127),
                np.array([kernels.histogram_entropy_threshold(hist, 4.0, 128)]),
                kernels.histogram_quantiles(hist, -3.0, 4.0, np.linspace(0, 1, 101))]
    return run


def _gram_product(rows, k):
    def run():
        rng = np.random.default_rng(RNG_SEED)
        return [kernels.gram_product(rng.standard_normal((rows, k)).astype(np.float32),
                                     rng.standard_normal((k, k)).astype(np.float32))]
    return run


def _gram_product_update(rows, k):
    def run():
        rng = np.random.default_rng(RNG_SEED)
        x_prev = rng.standard_normal((rows, k)).astype(np.float32)
        x = np.where(rng.random((rows, k)) < 0.3, rng.standard_normal((rows, k)), x_prev).astype(np.float32)
        g = rng.standard_normal((rows, k)).astype(np.float32)
        kernels.gram_product_update(x_prev, x, rng.standard_normal((k, k)).astype(np.float32), g)
        return [g]
    return run


CASES = {
    "window_gram full conv": _window_gram(1),
    "window_gram full conv, no f": _window_gram(1, with_f=False),
    "window_gram 2 groups": _window_gram(2),
    "window_gram 3 groups, stride 2": _window_gram(3, stride=2),
    "window_gram 4 groups, dilation 2": _window_gram(4, dilation=2, pad=2),
    "window_gram depthwise 5x5": _window_gram(12, kernel=5, pad=2),
    "window_gram depthwise, no f": _window_gram(12, with_f=False),
    "fit_rounding AdaRound": _fit_rounding(3, 21, 37, kernels.RoundingAlgorithm.AdaRound),
    "fit_rounding AdaQuant": _fit_rounding(2, 17, 20, kernels.RoundingAlgorithm.AdaQuant),
    # long enough for saturation: incremental products, periodic full ones and the regulariser
    "fit_rounding AdaRound, 300 iterations": _fit_rounding(2, 19, 70, kernels.RoundingAlgorithm.AdaRound, 300),
    # one-row groups 8 to a block, the last block partly filled; k = 25 padded to 32
    "fit_rounding AdaRound, depthwise": _fit_rounding(19, 1, 25, kernels.RoundingAlgorithm.AdaRound, 100),
    # without V asked for, frozen entries leave the element-wise loops (packed active entries)
    "fit_rounding AdaRound, 300 iterations, no V": _fit_rounding(2, 19, 70, kernels.RoundingAlgorithm.AdaRound, 300,
                                                                 return_param=False),
    "fit_rounding AdaRound, depthwise, no V": _fit_rounding(19, 1, 25, kernels.RoundingAlgorithm.AdaRound, 300,
                                                            return_param=False),
    "gram_product_update": _gram_product_update(21, 83),
    "histogram and range": _histogram(1_000_003),
    "histogram and range, float64": _histogram(1_000_003, 100, np.float64),
    "channel_sums": _channel_sums((4, 96, 57, 31)),
    "channel_sums, float64": _channel_sums((3, 40, 1000), np.float64),
    "scale search": _scale_search(),
    "gram_product": _gram_product(67, 129),
}


@pytest.fixture
def thread_settings():
    threads, thresholds = kernels.get_num_threads(), _kernels._parallel_thresholds()
    _kernels._set_parallel_thresholds(False)  # every region on all threads, even small ones
    yield
    kernels.set_num_threads(threads)
    _kernels._set_parallel_thresholds(thresholds)


def assert_same_bits(got, want, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, what
        assert a.tobytes() == b.tobytes(), f"{what}: output {i} differs in {np.sum(a != b)} of {a.size} values"


@pytest.mark.parametrize("case", CASES)
def test_one_and_two_threads_give_the_same_bits(case, thread_settings):
    run = CASES[case]
    kernels.set_num_threads(1)
    one = run()
    kernels.set_num_threads(2)
    two, again = run(), run()
    assert_same_bits(two, one, f"{case}, 2 threads vs 1")
    assert_same_bits(again, two, f"{case}, 2 threads twice")


@pytest.fixture
def restore_isa():
    before = kernels.isa()
    yield
    kernels.set_isa(before)


@pytest.mark.parametrize("level", ["avx512", "avx2"])
@pytest.mark.parametrize("case", CASES)
def test_each_isa_level_gives_the_bits_of_the_baseline(case, level, restore_isa):
    if level not in kernels.supported_isas():
        pytest.skip(f"this CPU does not run {level}")
    run = CASES[case]
    kernels.set_isa("baseline")
    want = run()
    kernels.set_isa(level)
    assert kernels.isa() == level
    assert_same_bits(run(), want, f"{case}, {level} vs baseline")


def test_isa_levels_are_reported_and_refused_when_unknown(restore_isa):
    levels = kernels.supported_isas()
    assert levels[-1] == "baseline" and set(levels) <= {"avx512", "avx2", "baseline"}
    assert list(levels) == [lv for lv in ("avx512", "avx2", "baseline") if lv in levels]  # best first
    assert kernels.isa() == levels[0]  # the best one by default
    for level in levels:
        kernels.set_isa(level)
        assert kernels.isa() == level
    with pytest.raises(ValueError, match="unknown ISA level 'sse9': expected avx512, avx2 or baseline"):
        kernels.set_isa("sse9")
    for missing in {"avx512", "avx2"} - set(levels):
        with pytest.raises(ValueError, match=f"this CPU does not support the ISA level {missing}"):
            kernels.set_isa(missing)


def test_pyquant_isa_environment_variable_is_read_at_import():
    def isa_with(value):
        env = dict(os.environ, PYQUANT_ISA=value)
        return subprocess.run([sys.executable, "-c", "from pyquant import kernels; print(kernels.isa())"], env=env,
                              capture_output=True, text=True, timeout=120, cwd=tempfile.gettempdir())

    done = isa_with("baseline")
    assert done.returncode == 0 and done.stdout.split() == ["baseline"], done.stderr
    done = isa_with("sse9")
    assert done.returncode != 0 and "PYQUANT_ISA=sse9: unknown ISA level" in done.stderr
