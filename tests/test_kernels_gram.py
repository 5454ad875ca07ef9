"""The Gram kernels (window_gram, gram_product): memory safety and argument checks."""
import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from pyquant import kernels

NEG_ZERO_BITS = np.array(-0.0).view(np.uint64)


def accumulators(groups, k, with_float):
    zeros = lambda *shape: np.zeros(shape)  # noqa: E731
    if with_float:
        return zeros(groups, k, k), zeros(groups, k, k), zeros(groups, k, k), zeros(groups, k), zeros(groups, k)
    return zeros(groups, k, k), zeros(0, 0, 0), zeros(0, 0, 0), zeros(groups, k), zeros(0, 0)


@pytest.mark.parametrize("c,groups", [(3, 1), (4, 2), (16, 16)])  # full conv (per-image partials), grouped, depthwise
def test_window_gram_without_f_never_writes_the_float_accumulators(c, groups):
    """qf, ff and sum_f are zero-size views into a sentinel buffer: the kernel must not
    touch the memory they point at. The sentinel is -0.0 because adding a zero partial
    (what a stray write adds when there are no float inputs) turns it into +0.0."""
    k = c // groups * 9
    buf = np.full(3 * groups * k * k + 64, -0.0)
    qf, ff, sum_f = (as_strided(buf[8:], shape=shape) for shape in ((0, 0, 0), (0, 0, 0), (0, 0)))
    assert qf.ctypes.data == buf.ctypes.data + 8 * 8  # the views point inside the buffer
    qq, sum_q = np.zeros((groups, k, k)), np.zeros((groups, k))
    x = np.random.default_rng(0).standard_normal((3, c, 6, 5)).astype(np.float32)
    count = kernels.window_gram(x, None, groups, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), qq, qf, ff, sum_q, sum_f)
    assert count == 3 * 6 * 5
    np.testing.assert_array_equal(buf.view(np.uint64), NEG_ZERO_BITS)
    assert qq.any() and sum_q.any()


def test_window_gram_checks_each_accumulator_shape():
    x = np.ones((2, 3, 5, 5), np.float32)
    geometry = ((3, 3), (1, 1), (1, 1), (0, 0, 0, 0))
    qq, qf, ff, sum_q, sum_f = accumulators(1, 27, True)
    with pytest.raises(ValueError, match=r"qq must have shape \(1, 27, 27\), got \(1, 27, 26\)"):
        kernels.window_gram(x, x, 1, *geometry, qq[:, :, :26].copy(), qf, ff, sum_q, sum_f)
    with pytest.raises(ValueError, match=r"ff must have shape \(1, 27, 27\), got \(2, 27, 27\)"):
        kernels.window_gram(x, x, 1, *geometry, qq, qf, np.zeros((2, 27, 27)), sum_q, sum_f)
    with pytest.raises(ValueError, match=r"sum_f must have shape \(1, 27\), got \(27,\)"):
        kernels.window_gram(x, x, 1, *geometry, qq, qf, ff, sum_q, np.zeros(27))
    with pytest.raises(ValueError, match=r"sum_q must have shape \(1, 27\), got \(1, 9\)"):
        kernels.window_gram(x, None, 1, *geometry, qq, *accumulators(1, 27, False)[1:3], np.zeros((1, 9)),
                            np.zeros((0, 0)))
    with pytest.raises(ValueError, match=r"qf must be empty when f is None .* got shape \(1, 27, 27\)"):
        kernels.window_gram(x, None, 1, *geometry, qq, qf, ff, sum_q, sum_f)
    with pytest.raises(TypeError, match="qq must be a C-contiguous float64"):
        kernels.window_gram(x, x, 1, *geometry, qq.astype(np.float32), qf, ff, sum_q, sum_f)
    assert not qq.any() and not sum_q.any()  # a rejected call adds nothing
