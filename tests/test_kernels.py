"""Every C++ kernel against its numpy reference (pyquant.reference)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pyquant import _kernels, kernels, reference

SIZES = [0, 1, 7, 8, 9, 1023, 1_000_003]
# The kernels sum in a different order than numpy (per thread, per lane).
SUM_RTOL = 1e-9
# The closed-form error integral vs numerical integration with 2000 samples per bin.
INTEGRAL_RTOL = 1e-4
QUANTILE_ATOL = 1e-9


def make(n, kind, rng):
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "relu6":
        return np.clip(rng.standard_normal(n) * 3, 0, 6).astype(np.float32)
    if kind == "constant":
        return np.full(n, 2.5, np.float32)
    if kind == "huge":
        return (rng.standard_normal(n) * 1e30).astype(np.float32)
    raise ValueError(kind)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["normal", "relu6", "constant", "huge"])
def test_range_stats_matches_reference(n, kind):
    x = make(n, kind, np.random.default_rng(n))
    got, want = kernels.range_stats(x), reference.range_stats(x)
    assert (got.finite, got.nan, got.pos_inf, got.neg_inf) == want[:4]
    if n:
        assert got.min == want.min and got.max == want.max
    else:
        assert got.min == np.inf and got.max == -np.inf


def test_range_stats_counts_nan_and_inf_separately():
    x = np.array([1.0, np.nan, np.inf, -np.inf, -2.0, np.nan] * 20000, np.float32)
    s = kernels.range_stats(x)
    assert (s.finite, s.nan, s.pos_inf, s.neg_inf, s.min, s.max) == (40000, 40000, 20000, 20000, -2.0, 1.0)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["normal", "relu6", "constant", "huge"])
@pytest.mark.parametrize("nbins", [1, 7, 2048])
def test_histogram_accumulate_matches_reference(n, kind, nbins):
    x = make(n, kind, np.random.default_rng(n + nbins))
    lo, hi = (float(x.min()), float(x.max())) if n else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - abs(lo) - 1.0, hi + abs(hi) + 1.0
    got, want = np.zeros(nbins), np.zeros(nbins)
    kernels.histogram_accumulate(x, got, lo, hi)
    reference.histogram_accumulate(x, want, lo, hi)
    np.testing.assert_array_equal(got, want)
    assert got.sum() == n


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["normal", "relu6", "constant", "huge"])
@pytest.mark.parametrize("grid", ["covers", "too_narrow"])
def test_accumulate_if_in_range_matches_reference(n, kind, grid):
    x = make(n, kind, np.random.default_rng(n + 1))
    lo, hi = (float(x.min()), float(x.max())) if n else (0.0, 1.0)
    lo, hi = lo - abs(lo) - 1.0, hi + abs(hi) + 1.0
    if grid == "too_narrow":
        hi = (lo + hi) / 2
    got, want = np.zeros(512), np.zeros(512)
    added, stats = kernels.histogram_accumulate_if_in_range(x, got, lo, hi)
    want_added, want_stats = reference.histogram_accumulate_if_in_range(x, want, lo, hi)
    assert added == want_added
    assert (stats.finite, stats.nan, stats.pos_inf, stats.neg_inf) == want_stats[:4]
    if n:
        assert (stats.min, stats.max) == (want_stats.min, want_stats.max)
    np.testing.assert_array_equal(got, want)


def test_accumulate_if_in_range_leaves_hist_alone_on_nan():
    x = np.ones(100_000, np.float32)
    x[77_777] = np.nan
    h = np.zeros(16)
    added, stats = kernels.histogram_accumulate_if_in_range(x, h, 0.0, 2.0)
    assert not added and stats.nan == 1 and h.sum() == 0


def test_histogram_skips_non_finite_and_clamps_outside_values():
    x = np.array([np.nan, -10.0, 0.5, np.inf, 10.0, -np.inf], np.float32)
    h = np.zeros(4)
    kernels.histogram_accumulate(x, h, 0.0, 1.0)
    np.testing.assert_array_equal(h, [1, 0, 1, 1])


def test_histogram_accepts_non_contiguous_input_through_wrapper():
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    view = x[:, ::3].T  # neither C- nor F-contiguous
    got, want = np.zeros(100), np.zeros(100)
    kernels.histogram_accumulate(view, got, -4, 4)
    reference.histogram_accumulate(np.ascontiguousarray(view), want, -4, 4)
    np.testing.assert_array_equal(got, want)


def test_wrappers_accept_reversed_and_strided_views():
    src = np.arange(16, dtype=np.float64)
    got = kernels.histogram_rebin(src[::-1], -1.0, 1.0, -1.0, 1.0, 16)
    np.testing.assert_array_equal(got, src[::-1])
    x = np.random.default_rng(3).standard_normal((6, 10)).astype(np.float32)
    np.testing.assert_allclose(kernels.tensor_quant_errors(x[::-1, ::2], [0.1], 0, -128, 127),
                               reference.tensor_quant_errors(x[::-1, ::2], [0.1], 0, -128, 127), rtol=SUM_RTOL)


def test_bindings_reject_wrong_dtype_layout_and_shape():
    x = np.zeros((4, 4), np.float32)
    with pytest.raises(TypeError, match="range_stats: x must be float32 or float64, got int64"):
        _kernels.range_stats(x.astype(np.int64))
    with pytest.raises(ValueError, match="C-contiguous"):
        _kernels.range_stats(x[:, ::2])
    with pytest.raises(ValueError, match="1-D"):
        _kernels.histogram_accumulate(x, np.zeros((2, 2)), 0.0, 1.0)
    with pytest.raises(ValueError, match="hi > lo"):
        _kernels.histogram_accumulate(x, np.zeros(4), 1.0, 1.0)
    with pytest.raises(ValueError, match="writable"):
        h = np.zeros(4)
        h.flags.writeable = False
        _kernels.histogram_accumulate(x, h, 0.0, 1.0)
    with pytest.raises(ValueError, match="scales must be finite and positive"):
        kernels.histogram_quant_errors(np.ones(4), 0, 1, [0.0], [0], 0, 255)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        kernels.histogram_quantiles(np.ones(4), 0, 1, [1.5])


@pytest.mark.parametrize("src_bins,dst_bins", [(1, 1), (7, 9), (2048, 2048), (100, 37)])
@pytest.mark.parametrize("dst_range", [(-1.0, 1.0), (-3.0, 5.0), (0.25, 0.5)])
def test_histogram_rebin_matches_reference(src_bins, dst_bins, dst_range):
    src = np.random.default_rng(src_bins).random(src_bins) * 100
    got = kernels.histogram_rebin(src, -1.0, 1.0, *dst_range, dst_bins)
    want = reference.histogram_rebin(src, -1.0, 1.0, *dst_range, dst_bins)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_aligned_rebin_is_exact():
    src = np.arange(8, dtype=np.float64)
    got = kernels.histogram_rebin(src, 0.0, 0.8, -0.2, 1.4, 8)  # width x2, shifted by one old bin
    np.testing.assert_array_equal(got, [0, 1, 5, 9, 13, 0, 0, 0])


@pytest.mark.parametrize("lo,hi,zp,qmin,qmax", [(-3, 3, 0, -128, 127), (0, 6, 0, 0, 255), (-2, 5, 37, 0, 255)])
def test_histogram_quant_errors_match_numerical_integration(lo, hi, zp, qmin, qmax):
    hist = np.random.default_rng(1).random(64)
    scales = np.array([0.001, 0.01, 0.05, 0.2, 1.0])
    got = kernels.histogram_quant_errors(hist, lo, hi, scales, zp, qmin, qmax)
    want = reference.histogram_quant_errors(hist, lo, hi, scales, np.full(5, zp), qmin, qmax)
    np.testing.assert_allclose(got, want, rtol=INTEGRAL_RTOL)


@pytest.mark.parametrize("rows,cols", [(1, 0), (1, 1), (3, 7), (16, 1023)])
def test_tensor_quant_errors_match_reference(rows, cols):
    x = np.random.default_rng(cols).standard_normal((rows, cols)).astype(np.float32)
    scales = np.array([0.001, 0.01, 0.1])
    got = kernels.tensor_quant_errors(x, scales, 0.0, -128, 127)
    np.testing.assert_allclose(got, reference.tensor_quant_errors(x, scales, 0.0, -128, 127), rtol=SUM_RTOL)


def test_tensor_quant_errors_skip_non_finite():
    x = np.array([[0.5, np.nan, np.inf, 1.0]], np.float32)
    got = kernels.tensor_quant_errors(x, [0.3], 0, -128, 127)
    np.testing.assert_allclose(got, [[(0.5 - 0.6) ** 2 + (1.0 - 0.9) ** 2]], rtol=1e-6)


@pytest.mark.parametrize("n", [1, 9, 1023])
def test_histogram_quantiles_match_reference(n):
    hist = np.random.default_rng(n).integers(0, 5, n).astype(np.float64)
    hist[0] += 1
    qs = np.array([0.0, 1e-6, 0.1, 0.5, 0.999999, 1.0])
    np.testing.assert_allclose(kernels.histogram_quantiles(hist, -2, 3, qs),
                               reference.histogram_quantiles(hist, -2, 3, qs), atol=QUANTILE_ATOL)


def test_histogram_quantile_of_empty_histogram_is_lo():
    assert kernels.histogram_quantiles(np.zeros(8), -1, 1, [0.5])[0] == -1


@pytest.mark.parametrize("nbins,num_quant_bins", [(128, 128), (300, 128), (512, 128), (64, 16)])
def test_entropy_threshold_matches_reference(nbins, num_quant_bins):
    x = np.abs(np.random.default_rng(nbins).standard_t(3, 200_000)).astype(np.float32)
    hist = np.zeros(nbins)
    kernels.histogram_accumulate(x, hist, 0, float(x.max()))
    got = kernels.histogram_entropy_threshold(hist, float(x.max()), num_quant_bins)
    assert got == pytest.approx(reference.histogram_entropy_threshold(hist, float(x.max()), num_quant_bins))


def test_entropy_threshold_clips_a_long_tail():
    x = np.abs(np.random.default_rng(0).standard_t(2, 500_000)).astype(np.float32)
    hist = np.zeros(2048)
    kernels.histogram_accumulate(x, hist, 0, float(x.max()))
    assert kernels.histogram_entropy_threshold(hist, float(x.max()), 128) < 0.5 * float(x.max())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=300), st.integers(1, 64))
def test_histogram_counts_sum_to_number_of_values(values, nbins):
    x = np.array(values, np.float32)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        hi = lo + 1.0
    h = np.zeros(nbins)
    kernels.histogram_accumulate(x, h, lo, hi)
    assert h.sum() == len(values)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=2, max_size=50), st.floats(0, 1), st.floats(0, 1))
def test_quantile_is_monotone_in_p(counts, p1, p2):
    hist = np.array(counts)
    a, b = kernels.histogram_quantiles(hist, 0, 1, sorted([p1, p2]))
    assert a <= b + 1e-12


CHANNEL_SUM_RTOL = 1e-6  # float blocks of 256 values, then double


@pytest.mark.parametrize("shape,axis", [((0, 3, 4), 1), ((1, 1), 1), ((7, 8, 9, 9), 1), ((2, 1023), 1),
                                        ((4, 96, 56, 56), 1), ((5, 6), 0), ((3, 4, 5), -1)])
def test_channel_sums_match_reference(shape, axis):
    x = (np.random.default_rng(len(shape)).standard_normal(shape) * 3 + 1).astype(np.float32)
    c = shape[axis]
    got, want = np.zeros(c), np.zeros(c)
    kernels.channel_sums(x, got, axis)
    reference.channel_sums(x, want, axis)
    np.testing.assert_allclose(got, want, rtol=CHANNEL_SUM_RTOL, atol=1e-6)


def test_channel_sums_accumulate_and_accept_non_contiguous_views():
    x = np.random.default_rng(0).standard_normal((6, 4, 10, 10)).astype(np.float32)
    view = x[:, :, ::2, ::3]
    got, want = np.ones(4), np.ones(4)
    kernels.channel_sums(view, got)
    reference.channel_sums(view, want)
    np.testing.assert_allclose(got, want, rtol=CHANNEL_SUM_RTOL)


def test_channel_sums_of_constant_and_huge_values():
    x = np.full((3, 2, 1000), 1e30, np.float32)
    got = np.zeros(2)
    kernels.channel_sums(x, got)
    np.testing.assert_allclose(got, [3e33, 3e33], rtol=CHANNEL_SUM_RTOL)
    with pytest.raises(ValueError, match="sums must have"):
        _kernels.channel_sums(x, np.zeros(3))
