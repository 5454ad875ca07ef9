"""The tensor statistics kernels (range, histograms, channel sums) against their numpy
references (pyquant.reference), over the house sweep: sizes 0, 1, 7, 8, 9, 1023 and about
1e6; normal, ReLU6-like, constant, huge and non-finite values; float32 and float64; C-order
and strided inputs."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pyquant import _kernels, kernels, reference

SIZES = [0, 1, 7, 8, 9, 1023, 1_000_003]
KINDS = ["normal", "relu6", "constant", "huge", "nonfinite"]
DTYPES = [np.float32, np.float64]
# Channel sums: double partial sums in a fixed order against numpy's pairwise float64 sum,
# relative to the sum of |x| of the channel (cancellation makes the sum itself small).
CHANNEL_SUM_RTOL = 1e-12
HUGE = {np.float32: 1e30, np.float64: 1e300}


def make(n, kind, rng, dtype=np.float32):
    x = rng.standard_normal(n)
    if kind == "relu6":
        x = np.clip(x * 3, 0, 6)
    elif kind == "constant":
        x = np.full(n, 2.5)
    elif kind == "huge":
        x = x * HUGE[dtype]
    elif kind == "nonfinite":
        x[::5] = np.nan
        x[1::11] = np.inf
        x[2::13] = -np.inf
    elif kind != "normal":
        raise ValueError(kind)
    return x.astype(dtype)


def strided(x):
    """The values of x in a view with a stride of two elements (not contiguous)."""
    buf = np.zeros(2 * x.size, x.dtype)
    buf[::2] = x.ravel()
    return buf[::2]


def finite_range(x):
    finite = x[np.isfinite(x)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - abs(lo) - 1.0, hi + abs(hi) + 1.0
    return lo, hi


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_range_stats_matches_reference(n, kind, dtype, layout):
    x = make(n, kind, np.random.default_rng(n), dtype)
    if layout == "strided":
        x = strided(x)
    got, want = kernels.range_stats(x), reference.range_stats(x)
    assert (got.finite, got.nan, got.pos_inf, got.neg_inf) == want[:4]
    assert (got.min, got.max) == (want.min, want.max)  # inf/-inf without a finite value


def test_range_stats_counts_nan_and_inf_separately():
    x = np.array([1.0, np.nan, np.inf, -np.inf, -2.0, np.nan] * 20000, np.float32)
    s = kernels.range_stats(x)
    assert (s.finite, s.nan, s.pos_inf, s.neg_inf, s.min, s.max) == (40000, 40000, 20000, 20000, -2.0, 1.0)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("nbins", [1, 7, 2048])
@pytest.mark.parametrize("dtype", DTYPES)
def test_histogram_accumulate_matches_reference(n, kind, nbins, dtype):
    x = make(n, kind, np.random.default_rng(n + nbins), dtype)
    lo, hi = finite_range(x)
    got, want = np.zeros(nbins), np.zeros(nbins)
    kernels.histogram_accumulate(x, got, lo, hi)
    reference.histogram_accumulate(x, want, lo, hi)
    np.testing.assert_array_equal(got, want)
    assert got.sum() == np.isfinite(x).sum()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_histogram_of_strided_input_matches_reference(n, dtype):
    x = strided(make(n, "normal", np.random.default_rng(n), dtype))
    got, want = np.zeros(100), np.zeros(100)
    kernels.histogram_accumulate(x, got, -4, 4)
    reference.histogram_accumulate(x, want, -4, 4)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grid", ["covers", "too_narrow"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_if_in_range_matches_reference(n, kind, grid, dtype):
    x = make(n, kind, np.random.default_rng(n + 1), dtype)
    lo, hi = finite_range(x)
    lo, hi = lo - abs(lo) - 1.0, hi + abs(hi) + 1.0
    if grid == "too_narrow":
        hi = (lo + hi) / 2
    got, want = np.zeros(512), np.zeros(512)
    added, stats = kernels.histogram_accumulate_if_in_range(x, got, lo, hi)
    want_added, want_stats = reference.histogram_accumulate_if_in_range(x, want, lo, hi)
    assert added == want_added
    assert (stats.finite, stats.nan, stats.pos_inf, stats.neg_inf, stats.min, stats.max) == tuple(want_stats)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("level", kernels.supported_isas())
@pytest.mark.parametrize("n", [1023, 1024, 1025, 3 * 1024 + 17, 200_000])
@pytest.mark.parametrize("grid", [(-1.0, 6.0), (0.5, 6.0), (-6.0, -0.5), (-2.0, 0.0)])
def test_histogram_of_mostly_zero_values_matches_reference_at_every_level(level, n, grid):
    # The AVX-512 and AVX2 copies count the values in the bin of zero apart from the others; zero
    # inside, below, above and on the edge of the grid, runs of zeros across block edges.
    rng = np.random.default_rng(n)
    x = np.maximum(rng.standard_normal(n), 0).astype(np.float32) * 3
    x[rng.random(n) < 0.2] = -0.0
    x[1000:1100] = 0.0
    x[::501] = np.nan
    x[7::733] = -np.inf
    lo, hi = grid
    before, before_threads = kernels.isa(), kernels.get_num_threads()
    try:
        kernels.set_isa(level)
        for threads in (1, 2):
            kernels.set_num_threads(threads)
            got, want = np.zeros(64), np.zeros(64)
            kernels.histogram_accumulate(x, got, lo, hi)
            reference.histogram_accumulate(x, want, lo, hi)
            np.testing.assert_array_equal(got, want)
            finite = np.nan_to_num(x, nan=0.0, neginf=0.0)
            got, want = np.zeros(64), np.zeros(64)
            added, stats = kernels.histogram_accumulate_if_in_range(finite, got, -1.0, 6.0)
            want_added, want_stats = reference.histogram_accumulate_if_in_range(finite, want, -1.0, 6.0)
            assert added == want_added
            assert (stats.finite, stats.nan, stats.pos_inf, stats.neg_inf, stats.min, stats.max) == tuple(want_stats)
            np.testing.assert_array_equal(got, want)
    finally:
        kernels.set_isa(before)
        kernels.set_num_threads(before_threads)


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


def test_histogram_accepts_a_transposed_view():
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    view = x[:, ::3].T  # neither C- nor F-contiguous
    got, want = np.zeros(100), np.zeros(100)
    kernels.histogram_accumulate(view, got, -4, 4)
    reference.histogram_accumulate(np.ascontiguousarray(view), want, -4, 4)
    np.testing.assert_array_equal(got, want)


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


# ---- channel sums ------------------------------------------------------------------------

# shapes [outer, channels, inner...] of 0, 1, 7, 8, 9, 1023 and about 1e6 values
CHANNEL_SHAPES = [(0, 3, 4), (1, 1, 1), (1, 7, 1), (2, 2, 2), (1, 3, 3), (3, 11, 31), (4, 96, 51, 51)]


def assert_sums_close(got, want, scale):
    """Equal where the sum is not finite; within CHANNEL_SUM_RTOL of sum |x| elsewhere."""
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite], want[~finite])
    assert np.all(np.abs(got[finite] - want[finite]) <= CHANNEL_SUM_RTOL * scale[finite])


@pytest.mark.parametrize("shape", CHANNEL_SHAPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_channel_sums_match_reference(shape, kind, dtype, layout):
    x = make(int(np.prod(shape)), kind, np.random.default_rng(len(shape)), dtype).reshape(shape)
    if layout == "strided":
        x = strided(x).reshape(shape)
    got, want = np.ones(shape[1]), np.ones(shape[1])  # accumulated into
    kernels.channel_sums(x, got)
    reference.channel_sums(x, want)
    scale = 1.0 + np.abs(x.astype(np.float64)).sum(axis=tuple(a for a in range(x.ndim) if a != 1))
    assert_sums_close(got, want, scale)


@pytest.mark.parametrize("shape,axis", [((5, 6), 0), ((3, 4, 5), -1), ((2, 1023), 1)])
def test_channel_sums_on_other_axes(shape, axis):
    x = (np.random.default_rng(0).standard_normal(shape) * 3 + 1).astype(np.float32)
    got, want = np.zeros(shape[axis]), np.zeros(shape[axis])
    kernels.channel_sums(x, got, axis)
    reference.channel_sums(x, want, axis)
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_channel_sums_of_float32_values_near_their_limit():
    x = np.full((3, 2, 1000), 3e38, np.float32)  # any float32 partial sum would overflow
    got = np.zeros(2)
    kernels.channel_sums(x, got)
    np.testing.assert_allclose(got, [3000 * np.float64(np.float32(3e38))] * 2, rtol=CHANNEL_SUM_RTOL)
    with pytest.raises(ValueError, match="sums must have"):
        _kernels.channel_sums(x, np.zeros(3))
