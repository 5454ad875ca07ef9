"""The scale-search kernels (histogram re-binning, quantization errors, quantiles, entropy
threshold) against their numpy references, over bin counts 1, 7, 8, 9, 1023 and about 1e6
where the reference is fast enough, empty/constant/spiky/huge histograms and strided views."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pyquant import kernels, reference

BINS = [1, 7, 8, 9, 1023, 1_000_003]
HIST_KINDS = ["random", "constant", "spike", "huge", "empty"]
# Re-binning: the kernel splits each source bin over the destination bins it overlaps; the
# reference interpolates the cumulative counts. Relative to the total mass.
REBIN_RTOL = 1e-9
# The closed-form error integral vs numerical integration (midpoint rule).
INTEGRAL_RTOL = 1e-4
# Both sum squared errors in float64, in different orders.
SUM_RTOL = 1e-9
# Quantiles: in units of the histogram's range.
QUANTILE_ATOL = 1e-9


def make_hist(nbins, kind, rng):
    if kind == "random":
        return rng.random(nbins) * 100
    if kind == "constant":
        return np.full(nbins, 3.0)
    if kind == "spike":
        h = np.zeros(nbins)
        h[nbins // 3] = 1e6
        return h
    if kind == "huge":
        return rng.random(nbins) * 1e200
    if kind == "empty":
        return np.zeros(nbins)
    raise ValueError(kind)


def reversed_view(h):
    """The values of h in a view with a negative stride."""
    return np.ascontiguousarray(h[::-1])[::-1]


@pytest.mark.parametrize("src_bins", BINS)
@pytest.mark.parametrize("kind", HIST_KINDS)
@pytest.mark.parametrize("dst_bins,dst_range", [(1, (-1.0, 1.0)), (9, (-3.0, 5.0)), (2048, (0.25, 0.5)),
                                                (1023, (-1.0, 1.0))])
def test_histogram_rebin_matches_reference(src_bins, kind, dst_bins, dst_range):
    src = make_hist(src_bins, kind, np.random.default_rng(src_bins))
    got = kernels.histogram_rebin(reversed_view(src), -1.0, 1.0, *dst_range, dst_bins)
    want = reference.histogram_rebin(src, -1.0, 1.0, *dst_range, dst_bins)
    np.testing.assert_allclose(got, want, rtol=0, atol=REBIN_RTOL * max(src.sum(), 1.0))


def test_aligned_rebin_is_exact():
    src = np.arange(8, dtype=np.float64)
    got = kernels.histogram_rebin(src, 0.0, 0.8, -0.2, 1.4, 8)  # width x2, shifted by one old bin
    np.testing.assert_array_equal(got, [0, 1, 5, 9, 13, 0, 0, 0])
    src = np.arange(16, dtype=np.float64)
    np.testing.assert_array_equal(kernels.histogram_rebin(src[::-1], -1.0, 1.0, -1.0, 1.0, 16), src[::-1])


@pytest.mark.parametrize("nbins", BINS[:-1])
@pytest.mark.parametrize("kind", HIST_KINDS)
@pytest.mark.parametrize("lo,hi,zp,qmin,qmax", [(-3, 3, 0, -128, 127), (0, 6, 0, 0, 255), (-2, 5, 37, 0, 255),
                                                (-1e30, 1e30, 0, -128, 127)])
def test_histogram_quant_errors_match_numerical_integration(nbins, kind, lo, hi, zp, qmin, qmax):
    hist = make_hist(nbins, kind, np.random.default_rng(nbins))
    width = hi - lo
    scales = np.array([1e-3, 1e-2, 5e-2, 0.2, 1.0]) * width / 6
    got = kernels.histogram_quant_errors(reversed_view(hist), lo, hi, scales, zp, qmin, qmax)
    # the midpoint rule needs some 200 samples per rounding step to reach INTEGRAL_RTOL
    samples = int(np.clip(200 * width / nbins / scales.min(), 2000, 4e6 / nbins))
    want = reference.histogram_quant_errors(hist, lo, hi, scales, np.full(5, zp), qmin, qmax, samples)
    np.testing.assert_allclose(got, want, rtol=INTEGRAL_RTOL, atol=0)


def test_histogram_quant_errors_refuse_bad_scales():
    with pytest.raises(ValueError, match="scales must be finite and positive"):
        kernels.histogram_quant_errors(np.ones(4), 0, 1, [0.0], [0], 0, 255)
    with pytest.raises(ValueError, match="scales must be finite and positive"):
        kernels.histogram_quant_errors(np.ones(4), 0, 1, [np.nan], [0], 0, 255)


# rows x cols of 0, 1, 7, 8, 9, 1023 and about 1e6 values
TENSOR_SHAPES = [(1, 0), (1, 1), (1, 7), (8, 1), (3, 3), (11, 93), (2, 500_001)]


@pytest.mark.parametrize("rows,cols", TENSOR_SHAPES)
@pytest.mark.parametrize("kind", ["normal", "constant", "huge", "nonfinite"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tensor_quant_errors_match_reference(rows, cols, kind, dtype):
    rng = np.random.default_rng(cols)
    x = rng.standard_normal((rows, 2 * cols))
    if kind == "constant":
        x[:] = 0.37
    elif kind == "huge":
        x *= 1e30
    elif kind == "nonfinite":
        x[:, ::7] = np.nan
        x[:, 3::11] = np.inf
    x = x.astype(dtype)[:, ::2]  # strided rows
    scales = np.array([1e-3, 0.01, 0.1, 1e29])
    got = kernels.tensor_quant_errors(x, scales, 0.0, -128, 127)
    want = reference.tensor_quant_errors(x, scales, 0.0, -128, 127)
    np.testing.assert_allclose(got, want, rtol=SUM_RTOL, atol=0)


@pytest.mark.parametrize("zero_point,qmin,qmax", [(0, -128, 127), (128, 0, 255), (3, 0, 255), (-7, -128, 127)])
def test_tensor_quant_errors_round_ties_to_even_and_clamp_with_a_zero_point(zero_point, qmin, qmax):
    # halves round to even (QuantizeLinear), values far beyond the grid saturate
    scale = 0.25
    halves = (np.arange(-300, 300) + 0.5) * scale
    x = np.concatenate([halves, [1e150, -1e150, 3e15, -3e15, 0.0]]).reshape(1, -1)
    got = kernels.tensor_quant_errors(x, [scale], float(zero_point), qmin, qmax)
    want = reference.tensor_quant_errors(x, [scale], float(zero_point), qmin, qmax)
    np.testing.assert_allclose(got, want, rtol=SUM_RTOL, atol=0)
    finite = x[:, :-5]
    q = np.clip(np.round(finite / scale) + zero_point, qmin, qmax)  # numpy rounds half to even
    exact = np.sum((finite - scale * (q - zero_point)) ** 2)
    np.testing.assert_allclose(kernels.tensor_quant_errors(finite, [scale], float(zero_point), qmin, qmax),
                               [[exact]], rtol=1e-12)


def test_tensor_quant_errors_skip_non_finite():
    x = np.array([[0.5, np.nan, np.inf, 1.0]], np.float32)
    got = kernels.tensor_quant_errors(x, [0.3], 0, -128, 127)
    np.testing.assert_allclose(got, [[(0.5 - 0.6) ** 2 + (1.0 - 0.9) ** 2]], rtol=1e-6)


@pytest.mark.parametrize("nbins", BINS)
@pytest.mark.parametrize("kind", HIST_KINDS)
def test_histogram_quantiles_match_reference(nbins, kind):
    hist = make_hist(nbins, kind, np.random.default_rng(nbins))
    qs = np.array([0.0, 1e-6, 0.1, 0.5, 0.999999, 1.0])
    got = kernels.histogram_quantiles(reversed_view(hist), -2, 3, qs)
    np.testing.assert_allclose(got, reference.histogram_quantiles(hist, -2, 3, qs), atol=QUANTILE_ATOL * 5, rtol=0)


def test_histogram_quantile_of_empty_histogram_is_lo():
    assert kernels.histogram_quantiles(np.zeros(8), -1, 1, [0.5])[0] == -1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        kernels.histogram_quantiles(np.ones(4), 0, 1, [1.5])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=2, max_size=50), st.floats(0, 1), st.floats(0, 1))
def test_quantile_is_monotone_in_p(counts, p1, p2):
    hist = np.array(counts)
    a, b = kernels.histogram_quantiles(hist, 0, 1, sorted([p1, p2]))
    assert a <= b + 1e-12


@pytest.mark.parametrize("nbins,num_quant_bins", [(1, 1), (7, 4), (8, 8), (9, 2), (1023, 128), (300, 128),
                                                  (512, 128)])
@pytest.mark.parametrize("kind", ["heavy_tail", "constant", "spike", "empty"])
def test_entropy_threshold_matches_reference(nbins, num_quant_bins, kind):
    rng = np.random.default_rng(nbins)
    if kind == "heavy_tail":
        x = np.abs(rng.standard_t(3, 200_000)).astype(np.float32)
        hist = np.zeros(nbins)
        kernels.histogram_accumulate(x, hist, 0, float(x.max()))
    else:
        hist = make_hist(nbins, {"constant": "constant", "spike": "spike", "empty": "empty"}[kind], rng)
    got = kernels.histogram_entropy_threshold(reversed_view(hist), 7.5, num_quant_bins)
    assert got == pytest.approx(reference.histogram_entropy_threshold(hist, 7.5, num_quant_bins), rel=1e-12)


def test_entropy_threshold_clips_a_long_tail():
    x = np.abs(np.random.default_rng(0).standard_t(2, 500_000)).astype(np.float32)
    hist = np.zeros(2048)
    kernels.histogram_accumulate(x, hist, 0, float(x.max()))
    assert kernels.histogram_entropy_threshold(hist, float(x.max()), 128) < 0.5 * float(x.max())
