"""What the kernel wrappers do with dtypes: float64 tensors keep their range in the
statistics kernels, other dtypes are converted only where no value changes, and sizes
that would allocate absurd amounts are refused."""
import numpy as np
import pytest

from pyquant import kernels, reference

LOSSLESS_TO_FLOAT32 = [np.float16, np.int8, np.uint8, np.int16, np.uint16, np.bool_]


def test_range_stats_of_float64_beyond_float32_range():
    s = kernels.range_stats(np.array([1e300, 1.0, -1e-320, np.nan]))
    assert (s.finite, s.nan, s.min, s.max) == (3, 1, -1e-320, 1e300)
    added, s = kernels.histogram_accumulate_if_in_range(np.array([1e300, -2e300]), np.zeros(8), -1e301, 1e301)
    assert added and (s.min, s.max) == (-2e300, 1e300)


@pytest.mark.parametrize("n", [1, 1023, 100_003])
def test_float64_histogram_bins_in_float64(n):
    x = np.random.default_rng(n).standard_normal(n) * 1e200
    lo, hi = float(x.min()) - 1e199, float(x.max()) + 1e199
    got, want = np.zeros(100), np.zeros(100)
    kernels.histogram_accumulate(x, got, lo, hi)
    reference.histogram_accumulate(x, want, lo, hi)
    np.testing.assert_array_equal(got, want)
    assert got.sum() == n
    # values 1 ulp apart in float64 but equal in float32 fall into different bins
    close = np.array([1.0, 1.0 + 2 ** -40])
    h = np.zeros(2)
    kernels.histogram_accumulate(close, h, 1.0, 1.0 + 2 ** -39)
    np.testing.assert_array_equal(h, [1, 1])


def test_channel_sums_of_float64():
    x = np.array([[[1e300, 1e300], [1.0, 2.0 ** -60]], [[-1e300, 3.0], [1.0, 0.0]]])  # [2, 2, 2]
    sums = np.zeros(2)
    kernels.channel_sums(x, sums)
    np.testing.assert_array_equal(sums, [1e300 + 3.0, 2.0 + 2.0 ** -60])


def test_tensor_quant_errors_of_float64_rows():
    x = np.array([[0.1 + 1e-12, 0.3]])
    got = kernels.tensor_quant_errors(x, [0.1], 0.0, -128, 127)
    np.testing.assert_allclose(got, reference.tensor_quant_errors(x, [0.1], 0.0, -128, 127), rtol=1e-12)


@pytest.mark.parametrize("dtype", LOSSLESS_TO_FLOAT32)
def test_narrow_dtypes_are_converted_exactly(dtype):
    x = (np.arange(-50, 50) % 7).astype(dtype)
    as32 = x.astype(np.float32)
    assert kernels.range_stats(x).max == kernels.range_stats(as32).max
    got, want = np.zeros(16), np.zeros(16)
    kernels.histogram_accumulate(x, got, -1, 7)
    kernels.histogram_accumulate(as32, want, -1, 7)
    np.testing.assert_array_equal(got, want)
    w = x[:96].reshape(2, 3, 4, 4)
    np.testing.assert_array_equal(kernels.channel_abs_max(w), kernels.channel_abs_max(w.astype(np.float32)))


def test_wide_integers_are_converted_only_when_every_value_is_exact():
    big = np.array([2 ** 60 + 1, 0], np.int64)
    with pytest.raises(TypeError, match="range_stats: x has dtype int64"):
        kernels.range_stats(big)
    s = kernels.range_stats(np.array([2 ** 53, -3], np.int64))  # exact in float64
    assert (s.min, s.max) == (-3, 2 ** 53)
    s = kernels.range_stats(np.array([2 ** 31 - 1], np.int32))  # 32-bit integers go to float64, not float32
    assert s.max == 2 ** 31 - 1
    # Python ints (int64 arrays) work where they are exact: zero points, quantiles
    got = kernels.tensor_quant_errors(np.ones((1, 4), np.float32), [0.5], 0, -128, 127)
    np.testing.assert_array_equal(got, [[0.0]])
    with pytest.raises(TypeError, match="channel_abs_max: w has dtype int32"):
        kernels.channel_abs_max(np.full((1, 1, 1, 2), 2 ** 30 + 1, np.int32))


@pytest.mark.parametrize("call", [
    lambda x: kernels.channel_abs_max(x.reshape(1, 2, 2, 2)),
    lambda x: kernels.gram_product(x.reshape(2, 4), np.eye(4, dtype=np.float32)),
    lambda x: kernels.scale_channels(np.ones((1, 1, 8, 1), np.float32), x),
    lambda x: kernels.window_gram(x.reshape(1, 2, 2, 2), None, 1, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0),
                                  np.zeros((1, 2, 2)), np.zeros((0, 0, 0)), np.zeros((0, 0, 0)), np.zeros((1, 2)),
                                  np.zeros((0, 0))),
    lambda x: kernels.fit_rounding(x.reshape(1, 2, 4), np.ones((1, 2), np.float32), np.eye(4, dtype=np.float32)[None],
                                   np.zeros((1, 2, 4), np.float32), -128, 127),
], ids=["channel_abs_max", "gram_product", "scale_channels", "window_gram", "fit_rounding"])
def test_float32_kernels_refuse_float64_data(call):
    x = np.linspace(-1, 1, 8)  # float64
    with pytest.raises(TypeError, match=r"^\w+: \w+ has dtype float64, whose values float32 cannot all hold"):
        call(x)
    call(x.astype(np.float32))  # fine once the caller has chosen the rounding


def test_other_dtypes_are_refused_by_name():
    with pytest.raises(TypeError, match="histogram_quantiles: hist has dtype complex128"):
        kernels.histogram_quantiles(np.ones(4, complex), 0, 1, [0.5])
    with pytest.raises(TypeError, match="range_stats: x has dtype <U1"):
        kernels.range_stats(np.array(["a"]))
    with pytest.raises(TypeError, match="histogram_rebin: src has dtype uint64"):
        kernels.histogram_rebin(np.array([2 ** 64 - 1], np.uint64), 0, 1, 0, 1, 4)


def test_fit_rounding_rounds_float64_statistics_to_its_float32_loop():
    w = np.array([[[0.26, -0.74]]], np.float32)
    scale, gram, target = np.array([[0.5]]), np.eye(2)[None], w.astype(np.float64)  # float64, as finetune.py passes
    q = kernels.fit_rounding(w, scale, gram, target, -128, 127, iterations=0).q
    np.testing.assert_array_equal(q, [[[1, -1]]])
    with pytest.raises(ValueError, match="fit_rounding: gram has values beyond float32's range"):
        kernels.fit_rounding(w, scale, np.eye(2)[None] * 1e39, target, -128, 127)


def test_bin_counts_are_bounded():
    big = kernels.MAX_BINS
    assert big == 2 ** 20
    for bad in (0, -1, big + 1, 2 ** 40, 1.5, True, None):
        with pytest.raises(ValueError, match=rf"histogram_rebin: dst_bins must be an integer in \[1, {big}\]"):
            kernels.histogram_rebin(np.ones(4), 0, 1, 0, 1, bad)
    with pytest.raises(ValueError, match=rf"num_quant_bins must be an integer in \[1, {big}\]"):
        kernels.histogram_entropy_threshold(np.ones(16), 1.0, 0)
    with pytest.raises(ValueError, match=r"num_quant_bins must be in \[1, len\(abs_hist\)\] = \[1, 16\], got 17"):
        kernels.histogram_entropy_threshold(np.ones(16), 1.0, 17)
    with pytest.raises(ValueError, match=rf"hist must have 1 to {big} bins, got {big + 1}"):
        kernels.histogram_accumulate(np.ones(4, np.float32), np.zeros(big + 1), 0, 1)
    with pytest.raises(ValueError, match=rf"src must have 1 to {big} bins, got 0"):
        kernels.histogram_rebin(np.ones(0), 0, 1, 0, 1, 4)
    assert kernels.histogram_rebin(np.ones(4), 0, 1, 0, 1, big).sum() == pytest.approx(4)


def test_histogram_range_must_have_a_finite_width():
    with pytest.raises(ValueError, match=r"finite width hi - lo, got \[-1e\+308, 1e\+308\]"):
        kernels.histogram_accumulate(np.ones(3), np.zeros(4), -1e308, 1e308)
