"""The cross-layer equalization kernels (channel_abs_max, equalization_scales,
scale_channels) against their numpy references over the house sweep."""
import numpy as np
import pytest

from pyquant import kernels, reference

# [A, B, C, D] views of 0, 1, 7, 8, 9, 1023 and about 1e6 values
SHAPES = [(0, 1, 1, 4), (1, 1, 1, 1), (7, 1, 1, 1), (2, 2, 2, 1), (1, 3, 3, 1), (3, 11, 31, 1), (64, 16, 32, 32)]
SIZES = [0, 1, 7, 8, 9, 1023, 1_000_003]
KINDS = ["normal", "constant", "huge", "nonfinite"]
# Both compute the scales in float64 and round them to float32; pow may differ in the last
# bit of a double, which can move the float32 result by one unit.
SCALE_RTOL = 1.2e-7


def make(shape, kind, rng):
    x = rng.standard_normal(shape)
    if kind == "constant":
        x[:] = -0.75
    elif kind == "huge":
        x *= 1e37
    elif kind == "nonfinite":
        flat = x.reshape(-1)
        flat[::5] = np.nan
        flat[1::7] = np.inf
    return x.astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_channel_abs_max_matches_reference(shape, kind, layout):
    w = make(shape, kind, np.random.default_rng(len(shape)))
    if layout == "strided":
        w = np.repeat(w, 2, axis=3)[..., ::2]
    np.testing.assert_array_equal(kernels.channel_abs_max(w), reference.channel_abs_max(w))


def ranges(n, kind, rng):
    r = rng.lognormal(0, 2, n)
    if kind == "constant":
        r[:] = 0.5
    elif kind == "huge":
        r = rng.lognormal(0, 30, n)  # 1e-30 ... 1e30, a few beyond float32's range (inf)
    elif kind == "nonfinite":
        r[::3] = np.inf
        r[1::5] = np.nan
        r[2::7] = 0.0
    with np.errstate(over="ignore"):
        return r.astype(np.float32)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act_weight", [None, 0.0, 0.25, 1.0])
def test_equalization_scales_match_reference(n, kind, act_weight):
    rng = np.random.default_rng(n)
    r1, r2 = ranges(n, kind, rng), ranges(n, "normal", rng)[::-1]  # r2 a reversed view
    act = None if act_weight is None else ranges(n, kind, rng).astype(np.float64)
    got = kernels.equalization_scales(r1, r2, 1e4, act, act_weight or 0.0)
    want = reference.equalization_scales(r1, r2, 1e4, act, act_weight or 0.0)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=SCALE_RTOL, atol=0)
    assert np.all((got >= 1e-4) & (got <= 1e4))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("divide", [False, True])
def test_scale_channels_matches_reference(shape, kind, divide):
    rng = np.random.default_rng(len(shape))
    w = make(shape, kind, rng)
    s = rng.uniform(0.1, 10, shape[0] * shape[2]).astype(np.float32)
    want = reference.scale_channels(w, s[::-1], divide)
    kernels.scale_channels(w, s[::-1], divide)  # s a reversed view
    np.testing.assert_array_equal(w, want)


def test_scale_channels_works_in_place_only_on_contiguous_float32():
    w = np.ones((2, 3, 4, 5), np.float32)
    with pytest.raises(TypeError, match="C-contiguous float32"):
        kernels.scale_channels(w[:, :, :, ::2], np.ones(8, np.float32))
    with pytest.raises(TypeError, match="C-contiguous float32"):
        kernels.scale_channels(w.astype(np.float64), np.ones(8, np.float32))
