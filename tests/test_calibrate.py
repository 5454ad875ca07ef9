"""Streaming collectors and calibration methods."""
import dataclasses
import gc
import tracemalloc

import numpy as np
import pytest

from pyquant import reference
from pyquant.calibrate import NonFiniteValues, TensorCollector, activation_qparams, weight_qparams
from pyquant.calibrate.collector import ChannelMeanCollector
from pyquant.calibrate.methods import ACTIVATION_METHODS, POW2_SEARCH_STEPS, qparams_from_range
from pyquant.config import CalibrationMethod, PowerOfTwoMethod, QuantConfig, QuantType
from pyquant import kernels


def batches(rng, n=6, scale_growth=True):
    return [(rng.standard_normal((4, 16, 20)) * (1 + i * scale_growth) + i * 0.3).astype(np.float32)
            for i in range(n)]


def test_streaming_matches_one_shot_range_and_count():
    rng = np.random.default_rng(0)
    data = batches(rng)
    c = TensorCollector(512)
    for b in data:
        c.update(b)
    allx = np.concatenate([b.ravel() for b in data])
    assert c.min == allx.min() and c.max == allx.max()
    assert c.count == allx.size and c.hist.sum() == pytest.approx(allx.size)
    assert c.lo <= allx.min() and c.hi >= allx.max()


def test_growing_histogram_is_close_to_one_shot_histogram():
    rng = np.random.default_rng(1)
    data = batches(rng)
    c = TensorCollector(512)
    for b in data:
        c.update(b)
    allx = np.concatenate([b.ravel() for b in data])
    direct = np.zeros(512)
    reference.histogram_accumulate(allx, direct, c.lo, c.hi)
    # Re-binning only coarsens: each old bin lies inside one new bin, so the
    # cumulative distributions agree at the coarse grid's resolution.
    cdf_stream = np.cumsum(c.hist) / c.hist.sum()
    cdf_direct = np.cumsum(direct) / direct.sum()
    assert np.abs(cdf_stream - cdf_direct).max() < 0.02


@pytest.mark.parametrize("direction", [-1, 1])
def test_creeping_range_keeps_resolution(direction):
    # Each batch extends the range a little on one side: the grid must not double each time.
    c = TensorCollector(2048)
    rng = np.random.default_rng(9)
    for i in range(60):
        c.update((direction * np.abs(rng.standard_normal(1000)) * (1 + 0.05 * i)).astype(np.float32))
    assert (c.hi - c.lo) <= 4 * (c.max - c.min)


# Memory still allocated by a collector after absorbing many batches, beyond what it held
# after a few (measured: within 100 bytes). One batch is 5 KB; keeping even 8 bytes per
# batch (a list slot) exceeds this over the 195 extra batches.
MEMORY_GROWTH_TOLERANCE_BYTES = 1024
BATCH_COUNTS = (5, 50, 200)


def numpy_state_bytes(obj) -> int:
    """Total nbytes of the numpy arrays an object holds (in its attributes, lists, dicts)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(numpy_state_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(numpy_state_bytes(x) for x in obj.values())
    if hasattr(obj, "__dict__"):
        return numpy_state_bytes(vars(obj))
    return 0


def absorb(make_collector, n: int):
    """(bytes traced by tracemalloc, numpy state bytes) of a collector after ``n`` distinct
    batches; each batch is freed before the next is made, as calibration does."""
    rng = np.random.default_rng(n)
    gc.collect()
    tracemalloc.start()
    try:
        collector = make_collector()
        for i in range(n):
            # distinct data, its range creeping outwards: the histogram re-bins now and then
            collector.update((rng.standard_normal((4, 16, 20)) * (1 + 0.01 * i) + 0.001 * i).astype(np.float32))
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return traced, numpy_state_bytes(collector)


class KeepsBatches(TensorCollector):
    """A collector that leaks: it keeps a copy of every batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches = []

    def update(self, x):
        self.batches.append(np.array(x))
        return super().update(x)


class KeepsBatchMaxima(TensorCollector):
    """A collector that leaks a little: one Python float per batch."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.maxima = []

    def update(self, x):
        self.maxima.append(float(np.max(x)))
        return super().update(x)


def memory_growth(make_collector):
    """Growth from the fewest to each larger batch count: ([traced], [numpy state])."""
    absorb(make_collector, BATCH_COUNTS[0])  # warm-up: allocations made once per process
    measured = [absorb(make_collector, n) for n in BATCH_COUNTS]
    return ([traced - measured[0][0] for traced, _ in measured[1:]],
            [state - measured[0][1] for _, state in measured[1:]])


@pytest.mark.parametrize("make_collector", [lambda: TensorCollector(256), lambda: TensorCollector(256, histogram=False),
                                            lambda: ChannelMeanCollector(1)],
                         ids=["histogram", "range only", "channel means"])
def test_memory_does_not_grow_with_batches(make_collector):
    traced, state = memory_growth(make_collector)
    assert state == [0, 0]
    assert max(traced) <= MEMORY_GROWTH_TOLERANCE_BYTES, traced


def test_memory_measurement_catches_a_collector_that_keeps_batches():
    traced, state = memory_growth(lambda: KeepsBatches(256))
    batch_bytes = 4 * 16 * 20 * 4
    assert state == [(n - BATCH_COUNTS[0]) * batch_bytes for n in BATCH_COUNTS[1:]]
    assert min(traced) > MEMORY_GROWTH_TOLERANCE_BYTES
    assert traced[-1] >= state[-1]


def test_memory_measurement_catches_a_collector_that_keeps_a_number_per_batch():
    traced, state = memory_growth(lambda: KeepsBatchMaxima(256))
    assert state == [0, 0]  # no numpy state grows: only tracemalloc sees it
    assert min(traced) > MEMORY_GROWTH_TOLERANCE_BYTES, traced


def test_nan_is_reported_and_not_absorbed():
    c = TensorCollector(64)
    c.update(np.ones(10, np.float32))
    with pytest.raises(NonFiniteValues, match="1 NaN, 0 \\+Inf and 0 -Inf"):
        c.update(np.array([1.0, np.nan], np.float32))
    assert c.count == 10


def test_constant_tensor_and_empty_batches():
    c = TensorCollector(64)
    c.update(np.zeros(0, np.float32))
    assert c.count == 0
    c.update(np.full(100, 3.0, np.float32))
    assert c.min == c.max == 3.0 and c.hist.sum() == 100
    c.update(np.full(100, -1.0, np.float32))
    assert c.min == -1.0 and c.hist.sum() == 200


def test_merge_equals_collecting_both():
    rng = np.random.default_rng(3)
    data = batches(rng)
    a, b, both = TensorCollector(256), TensorCollector(256), TensorCollector(256)
    for i, x in enumerate(data):
        (a if i % 2 else b).update(x)
        both.update(x)
    m = a.merged(b)
    assert (m.min, m.max, m.count) == (both.min, both.max, both.count)
    assert m.hist.sum() == pytest.approx(both.hist.sum())


def test_magnitude_histogram_folds_mass():
    c = TensorCollector(200)
    c.update(np.array([-2.0, -1.0, 0.5, 3.0], np.float32))
    c.update(np.array([-5.0], np.float32))  # grows the grid
    mag, hi = c.magnitude_histogram()
    assert hi >= c.abs_max == 5.0  # covers every magnitude
    assert mag.sum() == pytest.approx(5.0)
    # |x| = 0.5, 1, 2, 3, 5: the mass below each threshold (all far from a value, in bins)
    below = lambda t: mag[:int(t / hi * len(mag))].sum()  # noqa: E731
    assert [below(t) for t in (0.25, 1.5, 2.5, 4.0)] == pytest.approx([0.0, 2.0, 3.0, 4.0])


def collector_of(x, bins=2048):
    c = TensorCollector(bins)
    c.update(x)
    return c


def hist_error(c, qp, qtype):
    return kernels.histogram_quant_errors(c.hist, c.lo, c.hi, [float(qp.scale)], [float(qp.zero_point)],
                                          qtype.qmin, qtype.qmax)[0]


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_search_is_never_worse_than_minmax(symmetric):
    x = np.random.default_rng(4).standard_t(3, 100_000).astype(np.float32)
    c = collector_of(x)
    cfg = QuantConfig(calibrate_method=CalibrationMethod.MSE, activation_symmetric=symmetric)
    mse = activation_qparams(c, cfg)
    minmax = activation_qparams(c, dataclasses.replace(cfg, calibrate_method=CalibrationMethod.MinMax))
    assert hist_error(c, mse, cfg.activation_type) <= hist_error(c, minmax, cfg.activation_type)
    assert float(mse.scale) < float(minmax.scale)  # a heavy tail is worth clipping


def test_pow2_minmse_is_power_of_two_and_never_worse_than_nonoverflow():
    x = np.random.default_rng(5).standard_t(3, 100_000).astype(np.float32)
    c = collector_of(x)
    cfg = QuantConfig(calibrate_method=PowerOfTwoMethod.MinMSE, activation_symmetric=True)
    best = activation_qparams(c, cfg)
    no = activation_qparams(c, dataclasses.replace(cfg, calibrate_method=PowerOfTwoMethod.NonOverflow))
    assert best.is_power_of_two and no.is_power_of_two
    assert hist_error(c, best, cfg.activation_type) <= hist_error(c, no, cfg.activation_type)
    assert int(best.zero_point) == 128  # uint8 with negative values: symmetric around 128
    assert float(no.scale) * 127 >= c.abs_max > float(no.scale) * 127 / 2


@pytest.mark.parametrize("non_negative", [False, True])
def test_pow2_minmse_searches_the_non_overflowing_exponent_and_the_steps_below_it(non_negative, monkeypatch):
    x = np.random.default_rng(5).standard_t(3, 10_000).astype(np.float32)
    c = collector_of(np.abs(x) if non_negative else x)
    w = np.random.default_rng(6).standard_t(3, (16, 8)).astype(np.float32)
    searched = {}

    def spy(name):
        real = getattr(kernels, name)

        def record(data, *args):
            scales = args[2] if name == "histogram_quant_errors" else args[0]  # after hist, lo, hi
            searched[name] = np.log2(np.asarray(scales, np.float64))
            return real(data, *args)
        monkeypatch.setattr(kernels, name, record)

    spy("histogram_quant_errors")
    spy("tensor_quant_errors")
    cfg = QuantConfig(calibrate_method=PowerOfTwoMethod.MinMSE, activation_symmetric=True)
    activation_qparams(c, cfg)
    weight_qparams(w, cfg)
    # levels: steps from zero to the largest code (uint8 from 0 or around 128, int8 around 0)
    for name, abs_max, levels in [("histogram_quant_errors", c.abs_max, 255 if non_negative else 127),
                                  ("tensor_quant_errors", float(np.abs(w).max()), 127)]:
        exponents = searched[name]
        top = int(exponents.max())
        assert 2.0 ** top * levels >= abs_max > 2.0 ** (top - 1) * levels, name  # the smallest that does not clip
        np.testing.assert_array_equal(np.sort(exponents), np.arange(top - POW2_SEARCH_STEPS, top + 1), name)


def test_pow2_for_non_negative_tensor_uses_full_uint8_range():
    c = collector_of(np.random.default_rng(6).uniform(0, 6, 10000).astype(np.float32))
    qp = activation_qparams(c, QuantConfig(calibrate_method=PowerOfTwoMethod.NonOverflow,
                                                  activation_symmetric=True))
    assert int(qp.zero_point) == 0 and float(qp.scale) == 2.0 ** -5  # 255 / 32 = 7.97 >= 6


@pytest.mark.parametrize("method", list(ACTIVATION_METHODS))
def test_every_method_handles_all_zero_tensor(method):
    c = collector_of(np.zeros(100, np.float32))
    qp = activation_qparams(c, QuantConfig(calibrate_method=method))
    assert float(qp.scale) > 0 and np.isfinite(float(qp.scale))


def test_percentile_is_monotone_and_bounded_by_minmax():
    x = np.random.default_rng(7).standard_normal(200_000).astype(np.float32)
    c = collector_of(x)
    scales = [float(activation_qparams(c, QuantConfig(calibrate_method=CalibrationMethod.Percentile,
                                                               percentile=p, activation_symmetric=True)).scale)
              for p in (99.0, 99.9, 99.99, 100.0)]
    assert scales == sorted(scales)
    assert scales[-1] == pytest.approx(c.abs_max / 127, rel=1e-3)


def test_qparams_from_range_asymmetric_represents_zero_exactly():
    qp = qparams_from_range(-1.0, 3.0, QuantType.QUInt8, symmetric=False)
    assert float(qp.scale) == pytest.approx(4.0 / 255)
    assert int(qp.zero_point) == 64


def test_weight_pow2_minmse_beats_nonoverflow_on_exact_error():
    w = np.random.default_rng(8).standard_t(2, (32, 3, 3, 3)).astype(np.float32)
    cfg = QuantConfig(calibrate_method=PowerOfTwoMethod.MinMSE)
    best = weight_qparams(w, cfg)
    no = weight_qparams(w, dataclasses.replace(cfg, calibrate_method=PowerOfTwoMethod.NonOverflow))
    err = lambda qp: reference.tensor_quant_errors(w.reshape(1, -1), [float(qp.scale)], 0, -128, 127)[0, 0]
    assert best.is_power_of_two and err(best) <= err(no)


def test_weight_per_channel_scales_follow_axis():
    w = np.stack([np.full((2, 3), v, np.float32) for v in (1.0, 2.0, 4.0)], axis=1)  # [2, 3, 3] axis 1
    qp = weight_qparams(w, QuantConfig(per_channel=True), axis=1)
    np.testing.assert_allclose(qp.scale, np.array([1.0, 2.0, 4.0]) / 127)
    assert qp.axis == 1


def test_weight_mse_scales_are_per_tensor_only():
    w = np.random.default_rng(9).standard_t(2, (16, 8, 3, 3)).astype(np.float32)
    cfg = QuantConfig(per_channel=True)
    assert cfg.weight_scale_mse
    np.testing.assert_allclose(weight_qparams(w, cfg, 0).scale, np.abs(w).reshape(16, -1).max(axis=1) / 127,
                               rtol=1e-6)
    assert float(weight_qparams(w, cfg, None).scale) < float(np.abs(w).max()) / 127  # heavy tails: clipped


@pytest.mark.parametrize("dead", [False, True])
def test_weight_mse_scales_beat_abs_max_and_match_a_brute_force_search(dead):
    w = np.random.default_rng(9).standard_t(2, (16, 8, 3, 3)).astype(np.float32)
    if dead:
        w[:] = 0.0
    axis = None
    cfg = QuantConfig()
    assert cfg.weight_scale_mse
    mse, plain = weight_qparams(w, cfg, axis), weight_qparams(w, dataclasses.replace(cfg, weight_scale_mse=False), axis)
    rows = w.reshape(1, -1) if axis is None else w.reshape(16, -1)
    abs_max = np.abs(rows).max(axis=1)
    np.testing.assert_allclose(np.atleast_1d(plain.scale)[abs_max > 0], abs_max[abs_max > 0] / 127, rtol=1e-6)
    ratios = np.linspace(0.3, 1.0, 1401)
    for i, row in enumerate(rows):
        if abs_max[i] == 0:
            assert np.atleast_1d(mse.scale)[i] > 0  # a usable scale for an all-zero channel
            continue
        err = lambda s: reference.tensor_quant_errors(row[None], [s], 0, -128, 127)[0, 0]  # noqa: E731
        chosen = float(np.atleast_1d(mse.scale)[i])
        assert 0.3 * abs_max[i] / 127 * (1 - 1e-6) <= chosen <= abs_max[i] / 127 * (1 + 1e-6)
        brute = reference.tensor_quant_errors(row[None], ratios * abs_max[i] / 127, 0, -128, 127)[0].min()
        assert err(chosen) <= err(float(np.atleast_1d(plain.scale)[i])) * (1 + 1e-9)
        assert err(chosen) <= brute * 1.02
    # fast finetune keeps abs max: its rounding must be able to reach every weight
    from pyquant.config import FastFinetuneOptions

    tuned = weight_qparams(w, dataclasses.replace(cfg, fast_finetune=FastFinetuneOptions()), axis)
    np.testing.assert_array_equal(tuned.scale, plain.scale)


def test_least_error_ratios_per_row_match_a_brute_force_search():
    from pyquant.calibrate.methods import _least_error_ratios

    rng = np.random.default_rng(4)  # tensors of a few thousand values: the error is smooth in the ratio
    rows = np.concatenate([rng.standard_t(2, (3, 4000)), rng.uniform(-1, 1, (3, 4000)), rng.normal(size=(2, 4000))])
    rows = (rows / np.abs(rows).max(axis=1, keepdims=True)).astype(np.float32)
    chosen = _least_error_ratios(rows, QuantType.QInt8)
    grid = np.linspace(0.3, 1.0, 1401)
    for row, c in zip(rows, chosen):
        brute = reference.tensor_quant_errors(row[None], grid / 127, 0, -128, 127)[0].min()
        assert 0.3 <= c <= 1.0
        assert reference.tensor_quant_errors(row[None], [c / 127], 0, -128, 127)[0, 0] <= brute * 1.02

