"""The Gram kernels of fast finetune (window_gram, gram_product, fit_rounding) against
their numpy references over sizes, geometries and layouts; memory safety and argument checks."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.lib.stride_tricks import as_strided

from pyquant import kernels, reference

# float32 dot products (gram_product: k terms in order; window_gram: 16 lanes over blocks of
# 512 positions, blocks added in float64) against float64, relative to the same sums of
# absolute values: a bound of the rounding error of any summation order.
GRAM_PRODUCT_RTOL = 1e-5
WINDOW_GRAM_RTOL = 1e-5
# fit_rounding (float32) against its float64 reference after a few iterations, as in
# tests/test_fast_finetune.py: parameters to 1e-3 of their scale.
FIT_PARAM_ATOL = 1e-3
# Saturated parameters keep moving with Adam's momentum (no gradient through the clamp), and
# the float32 loop's difference from float64 grows with them (0.06 % after 30 iterations in
# the saturating problem below, before and after the incremental products).
FIT_SATURATED_PARAM_RTOL = 1e-3

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


def assert_within(got, want, bound, rtol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    excess = np.abs(got - want) - rtol * bound
    assert np.all(excess <= 0), f"off by {np.max(np.abs(got - want)):.3g}, allowed {rtol:.1g} x bound"


# rows x k of 0, 1, 7, 8, 9, 1023 and about 1e6 values
PRODUCT_SHAPES = [(0, 5), (1, 1), (1, 7), (8, 1), (3, 3), (33, 31), (4096, 256)]


@pytest.mark.parametrize("rows,k", PRODUCT_SHAPES)
@pytest.mark.parametrize("kind", ["normal", "constant", "huge"])
@pytest.mark.parametrize("layout", ["contiguous", "fortran"])
def test_gram_product_matches_reference(rows, k, kind, layout):
    rng = np.random.default_rng(rows + k)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    a = rng.standard_normal((k, k)).astype(np.float32)
    if kind == "constant":
        x[:], a[:] = 0.5, -1.5
    elif kind == "huge":
        x *= np.float32(1e17)
    if layout == "fortran":
        x, a = np.asfortranarray(x), a.T.copy().T  # column-major: copied by the wrapper
    got = kernels.gram_product(x, a)
    assert got.shape == (rows, k) and got.dtype == np.float32
    assert_within(got, reference.gram_product(x, a), reference.gram_product(np.abs(x), np.abs(a)),
                  GRAM_PRODUCT_RTOL)


# (n, c, h, w, groups, kernel, stride, dilation, pads (top, left, bottom, right))
GEOMETRIES = {
    "full 3x3 pad 1": (2, 3, 9, 8, 1, 3, 1, 1, (1, 1, 1, 1)),
    "2 groups, no pad": (3, 4, 7, 7, 2, 3, 1, 1, (0, 0, 0, 0)),
    "depthwise 5x5 stride 2": (2, 8, 11, 11, 8, 5, 2, 1, (2, 2, 2, 2)),
    "3 groups dilation 2 uneven pads": (1, 6, 10, 9, 3, 3, 1, 2, (2, 1, 0, 3)),
    "1x1 stride 2": (2, 4, 8, 8, 1, 1, 2, 1, (0, 0, 0, 0)),
    "kernel covers the input": (2, 2, 3, 3, 1, 3, 1, 1, (0, 0, 0, 0)),
    "1x1 images": (7, 3, 1, 1, 1, 1, 1, 1, (0, 0, 0, 0)),
    "one image, one channel": (1, 1, 1, 1, 1, 1, 1, 1, (0, 0, 0, 0)),
    "full conv, 64k values": (2, 8, 64, 64, 1, 3, 1, 1, (1, 1, 1, 1)),
    "depthwise, 1e6 values": (2, 32, 128, 128, 32, 3, 1, 1, (1, 1, 1, 1)),
}


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("with_f", [True, False])
def test_window_gram_matches_reference(geometry, with_f):
    n, c, h, w, groups, k, stride, dilation, pads = GEOMETRIES[geometry]
    rng = np.random.default_rng(n * c * h)
    q = rng.standard_normal((n, c, h, 2 * w)).astype(np.float32)[..., ::2]  # a strided view
    f = (q + 0.1 * rng.standard_normal(q.shape)).astype(np.float32) if with_f else None
    kk = c // groups * k * k
    acc = [np.zeros((groups, kk, kk)), np.zeros((groups, kk, kk) if with_f else (0, 0, 0)),
           np.zeros((groups, kk, kk) if with_f else (0, 0, 0)), np.zeros((groups, kk)),
           np.zeros((groups, kk) if with_f else (0, 0))]
    geo = ((k, k), (stride, stride), (dilation, dilation), pads)
    count = kernels.window_gram(q, f, groups, *geo, *acc)
    want = reference.window_gram(q, f, groups, *geo)
    assert count == want.count
    abs_q = reference.im2col(np.abs(q), groups, *geo)
    abs_f = None if f is None else reference.im2col(np.abs(f), groups, *geo)
    outer = lambda a, b: np.einsum("gpi,gpj->gij", a, b)  # noqa: E731
    assert_within(acc[0], want.qq, outer(abs_q, abs_q), WINDOW_GRAM_RTOL)
    assert_within(acc[3], want.sum_q, abs_q.sum(axis=1), WINDOW_GRAM_RTOL)
    if with_f:
        assert_within(acc[1], want.qf, outer(abs_q, abs_f), WINDOW_GRAM_RTOL)
        assert_within(acc[2], want.ff, outer(abs_f, abs_f), WINDOW_GRAM_RTOL)
        assert_within(acc[4], want.sum_f, abs_f.sum(axis=1), WINDOW_GRAM_RTOL)
    # a second batch adds to the sums
    kernels.window_gram(q, f, groups, *geo, *acc)
    assert_within(acc[0], 2 * want.qq, 2 * outer(abs_q, abs_q), WINDOW_GRAM_RTOL)


def lane_order_sums(patches: np.ndarray):
    """window_gram's documented float32 order over positions [M, K] (csrc/kernels/window_gram.cc):
    per block of 512 positions, 16 lanes (position i into lane i % 16), the tail positions
    summed first, then the lanes in order; each block's sum added in float64."""
    k = patches.shape[1]
    gram, total = np.zeros((k, k)), np.zeros(k)
    for c0 in range(0, patches.shape[0], 512):
        block = patches[c0:c0 + 512]
        full = block.shape[0] // 16 * 16
        lanes_g, lanes_t = np.zeros((16, k, k), np.float32), np.zeros((16, k), np.float32)
        for i in range(0, full, 16):
            step = block[i:i + 16]
            lanes_g += step[:, :, None] * step[:, None, :]
            lanes_t += step
        s_g, s_t = np.zeros((k, k), np.float32), np.zeros(k, np.float32)
        for j in range(full, block.shape[0]):
            s_g += block[j, :, None] * block[j, None, :]
            s_t += block[j]
        for lane in range(16):
            s_g += lanes_g[lane]
            s_t += lanes_t[lane]
        gram += s_g.astype(np.float64)
        total += s_t.astype(np.float64)
    return gram, total


# (n, c, h, w, groups, kernel, stride, dilation, pads): blocks of 512 with tails, K = 25, 27
# and 18 (tiles of 4 and 2 with remainders), 1 and 4
ORDER_GEOMETRIES = {
    "depthwise 5x5, 3 images (all images of a group together)": (3, 8, 23, 23, 8, 5, 1, 1, (2, 2, 2, 2)),
    "full 3x3 (per-image partials)": (2, 3, 30, 31, 1, 3, 1, 1, (1, 1, 1, 1)),
    "2 groups stride 2": (3, 4, 21, 20, 2, 3, 2, 1, (1, 0, 1, 1)),
    "one channel 1x1 kernel stride 2": (1, 1, 9, 9, 1, 1, 2, 1, (0, 0, 0, 0)),
    "depthwise 2x2 kernel": (2, 4, 5, 5, 4, 2, 1, 1, (0, 0, 0, 0)),
}


@pytest.mark.parametrize("geometry", ORDER_GEOMETRIES)
def test_window_gram_without_f_sums_in_its_documented_order(geometry, restore_isa):
    """Bit for bit (every ISA level): the tiled accumulation computes each pair's sum in the
    order of the one-pair dot product it replaced, so Grams, and fast finetune, are unchanged."""
    n, c, h, w, groups, k, stride, dilation, pads = ORDER_GEOMETRIES[geometry]
    rng = np.random.default_rng(5)
    q = rng.standard_normal((n, c, h, w)).astype(np.float32)
    q[q < -1] = 0  # a ReLU-like share of zeros
    geo = ((k, k), (stride, stride), (dilation, dilation), pads)
    patches = reference.im2col(q, groups, *geo).astype(np.float32)  # [g, n * m, K], exact
    kk = patches.shape[2]
    m = patches.shape[1] // n
    want_g, want_t = np.zeros((groups, kk, kk)), np.zeros((groups, kk))
    for gi in range(groups):
        if groups >= 4:  # a group's patches of all images as one sequence
            want_g[gi], want_t[gi] = lane_order_sums(patches[gi])
        else:  # per image, the images' float64 partial sums added in image order
            for img in range(n):
                g_img, t_img = lane_order_sums(patches[gi, img * m:(img + 1) * m])
                want_g[gi] += g_img
                want_t[gi] += t_img
    for level in kernels.supported_isas():
        kernels.set_isa(level)
        acc = accumulators(groups, kk, False)
        kernels.window_gram(q, None, groups, *geo, *acc)
        np.testing.assert_array_equal(acc[0], want_g, err_msg=level)
        np.testing.assert_array_equal(acc[3], want_t, err_msg=level)


@pytest.fixture
def restore_isa():
    before = kernels.isa()
    yield
    kernels.set_isa(before)


@pytest.mark.parametrize("geometry", [g for g in GEOMETRIES if "1e6" not in g])
def test_reference_im2col_reproduces_the_convolution(geometry):
    """The reference's patches times a weight give onnxruntime's Conv output."""
    n, c, h, w, groups, k, stride, dilation, pads = GEOMETRIES[geometry]
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    out_c = 2 * groups
    weight = rng.standard_normal((out_c, c // groups, k, k)).astype(np.float32)
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], group=groups, strides=[stride] * 2,
                                 dilations=[dilation] * 2, pads=[pads[0], pads[1], pads[2], pads[3]])
    graph = onnx.helper.make_graph([node], "conv", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                                   [onnx.numpy_helper.from_array(weight, "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    patches = reference.im2col(x, groups, (k, k), (stride, stride), (dilation, dilation), pads)
    per_group = np.einsum("gpk,grk->gpr", patches, weight.reshape(groups, 2, -1))  # [g, n*oh*ow, 2]
    got = per_group.reshape(groups, n, y.shape[2], y.shape[3], 2).transpose(1, 0, 4, 2, 3).reshape(y.shape)
    np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4)


def fit_problem(groups, rows, k, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((groups, 4 * k + 4, k))
    xq = x + 0.05 * rng.standard_normal(x.shape)
    w = (rng.standard_normal((groups, rows, k)) * 0.3).astype(np.float32)
    gram = np.einsum("gnk,gnj->gkj", xq, xq) / x.shape[1]
    target = np.einsum("gkj,grj->grk", np.einsum("gnk,gnj->gkj", xq, x) / x.shape[1], w)
    scale = (np.abs(w).max(axis=2) / 127 * rng.uniform(1, 8, (groups, rows))).astype(np.float32)
    return w, scale, gram.astype(np.float32), target.astype(np.float32)


# (groups, rows, k): 1, 7, 8, 9 and 1023 weights, a depthwise-like and a wider layer; groups
# of fewer than 8 rows share a block (8 one-row groups, 2 three-row groups), the last one
# partly filled (11 and 5 groups); k = 25 and 20 pad to 32 with neutral entries
FIT_SHAPES = [(1, 1, 1), (1, 7, 1), (1, 1, 8), (1, 3, 3), (3, 11, 31), (16, 1, 9), (2, 17, 40), (11, 1, 25),
              (5, 3, 20)]


@pytest.mark.parametrize("shape", FIT_SHAPES)
@pytest.mark.parametrize("algorithm,lr", [(kernels.RoundingAlgorithm.AdaRound, 0.1),
                                          (kernels.RoundingAlgorithm.AdaQuant, 1e-3)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_fit_rounding_matches_reference(shape, algorithm, lr, layout):
    w, s, a, t = fit_problem(*shape)
    if layout == "transposed":  # views the wrapper copies: the same problem, other strides
        w, t = (np.ascontiguousarray(v.transpose(0, 2, 1)).transpose(0, 2, 1) for v in (w, t))
    for iterations in (0, 1, 7):
        fit = kernels.fit_rounding(w, s, a, t, -128, 127, algorithm=algorithm, iterations=iterations,
                                   learning_rate=lr, keep_best=False, return_param=True)
        q_ref, param_ref = reference.fit_rounding(w, s, a, t, -128, 127, algorithm=int(algorithm),
                                                  iterations=iterations, learning_rate=lr, keep_best=False)
        adaround = algorithm == kernels.RoundingAlgorithm.AdaRound
        np.testing.assert_allclose(fit.param, param_ref, atol=FIT_PARAM_ATOL * (1.0 if adaround else np.abs(w).max()))
        decided = np.abs(param_ref) > 1e-2 if adaround else slice(None)
        np.testing.assert_array_equal(fit.q[decided], q_ref[decided])


@pytest.mark.parametrize("level", ["baseline", "avx2", "avx512"])
def test_products_round_each_multiply_add_once(level, restore_isa):
    """gram_product and gram_product_update sum with fused multiply-adds at every ISA level
    (the baseline's fmaf included): column 1 is -1 + (1 + 2^-12)^2 = 2^-11 + 2^-24 exactly,
    which a rounded product (1 + 2^-11, a tie to even) then an add would give as 2^-11."""
    if level not in kernels.supported_isas():
        pytest.skip(f"this CPU does not run {level}")
    kernels.set_isa(level)
    u = np.float32(1 + 2.0 ** -12)
    x = np.array([[-1.0, u]], np.float32)
    a = np.array([[0.0, 1.0], [0.0, u]], np.float32)
    exact = 2.0 ** -11 + 2.0 ** -24
    assert kernels.gram_product(x, a)[0, 1] == np.float32(exact)
    g = np.zeros((1, 2), np.float32)
    kernels.gram_product_update(np.zeros_like(x), x, a, g)  # both entries changed: their sum, then g +=
    assert g[0, 1] == np.float32(exact)


@pytest.fixture
def restore_isa():
    before = kernels.isa()
    yield
    kernels.set_isa(before)


def test_fit_rounding_of_constant_weights_keeps_them_on_the_grid():
    w = np.full((1, 4, 6), 0.25, np.float32)
    s = np.full((1, 4), 0.1, np.float32)
    a = np.eye(6, dtype=np.float32)[None]
    fit = kernels.fit_rounding(w, s, a, w.copy(), -128, 127, iterations=50)
    assert set(np.unique(fit.q)) <= {2, 3}  # floor or ceil of 2.5


# (rows, k): 1, 7, 8, 9 and about 1e5 values, k below, at and above multiples of 16 and 64
UPDATE_SHAPES = [(1, 1), (1, 7), (8, 1), (3, 3), (9, 16), (5, 65), (17, 200), (1, 1023)]


@pytest.mark.parametrize("rows,k", UPDATE_SHAPES)
@pytest.mark.parametrize("changes", ["none", "one", "some", "all"])
def test_gram_product_update_matches_reference(rows, k, changes):
    rng = np.random.default_rng(rows * 1000 + k)
    a = rng.standard_normal((k, k)).astype(np.float32)
    x_prev = rng.standard_normal((rows, k)).astype(np.float32)
    g = kernels.gram_product(x_prev, a)
    mask = {"none": np.zeros((rows, k), bool), "all": np.ones((rows, k), bool),
            "some": rng.random((rows, k)) < 0.2, "one": np.eye(rows, k, k // 2, dtype=bool)}[changes]
    x = np.where(mask, rng.standard_normal((rows, k)), x_prev).astype(np.float32)
    got = g.copy()
    kernels.gram_product_update(x_prev, x, a, got)
    if changes == "none":
        assert got.tobytes() == g.tobytes()  # nothing changed: nothing added, not even zeros
    bound = np.abs(g) + reference.gram_product(np.abs(x - x_prev), np.abs(a))
    assert_within(got, reference.gram_product_update(x_prev, x, a, g), bound, GRAM_PRODUCT_RTOL)
    # after the update, g is x's product up to the rounding of the two sums
    assert_within(got, reference.gram_product(x, a), bound + reference.gram_product(np.abs(x), np.abs(a)),
                  GRAM_PRODUCT_RTOL)


def test_gram_product_update_reads_only_the_changed_entries_rows():
    """A NaN in a row of gram whose entry did not change must not reach g: the update adds
    the changed entries' rows only (what makes it cheaper than a product when most of
    fit_rounding's entries are saturated)."""
    rng = np.random.default_rng(3)
    rows, k = 10, 40
    a = rng.standard_normal((k, k)).astype(np.float32)
    x_prev = rng.standard_normal((rows, k)).astype(np.float32)
    x = x_prev.copy()
    x[:, 5] += 1.0
    x[3, 17] -= 2.0
    g = np.zeros((rows, k), np.float32)
    a_nan = a.copy()
    a_nan[[0, 6, 39]] = np.nan  # rows of unchanged entries
    kernels.gram_product_update(x_prev, x, a_nan, g)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, reference.gram_product(x - x_prev, a), rtol=1e-6, atol=1e-6)
    a_nan[17] = np.nan  # the row of a changed entry of row 3 only
    g[:] = 0
    kernels.gram_product_update(x_prev, x, a_nan, g)
    assert np.all(np.isnan(g[3])) and np.all(np.isfinite(np.delete(g, 3, axis=0)))


def test_gram_product_update_checks_shapes_and_dtypes():
    x = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match=r"x_prev must have the shape of x \(2, 4\), got \(2, 3\)"):
        kernels.gram_product_update(x[:, :3], x, np.eye(4, dtype=np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"gram must be \(k, k\) with k = x.shape\[1\] = 4"):
        kernels.gram_product_update(x, x, np.eye(3, dtype=np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match="g must be a C-contiguous float32"):
        kernels.gram_product_update(x, x, np.eye(4, dtype=np.float32), np.zeros((2, 4)))


def saturating_problem(groups, rows, k, seed=0):
    """fit_problem with every weight within 2 % of a grid point (h starts near 0 or 1), so
    that the entries saturate in the first iterations and fit_rounding's incremental
    products replace its full ones early."""
    w, s, a, t = fit_problem(groups, rows, k, seed)
    rng = np.random.default_rng(seed + 1)
    n = np.round(w / s[..., None])
    offset = rng.choice([-1.0, 1.0], w.shape) * rng.uniform(0.005, 0.02, w.shape)
    return (s[..., None] * (n + offset)).astype(np.float32), s, a, t


def saturated_fraction(param):
    """Entries whose h(V) is clamped to 0 or 1 (|V| beyond ln 11, the rectified sigmoid's ends)."""
    return float(np.mean(np.abs(np.asarray(param, np.float64)) > np.log(11.0)))


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 9, 17), (3, 11, 31), (16, 1, 25), (1, 20, 70)])
def test_fit_rounding_with_saturated_entries_matches_reference(shape):
    """About half the entries saturated after 3 iterations (incremental and full products
    mixed), 99 % or all of them by 30 (few or no changes to add)."""
    w, s, a, t = saturating_problem(*shape)
    for iterations, saturated in ((3, 0.3), (12, 0.9), (30, 0.99)):
        fit = kernels.fit_rounding(w, s, a, t, -128, 127, iterations=iterations, keep_best=False,
                                   return_param=True)
        q_ref, param_ref = reference.fit_rounding(w, s, a, t, -128, 127, iterations=iterations, keep_best=False)
        assert saturated_fraction(param_ref) >= saturated
        np.testing.assert_allclose(fit.param, param_ref, atol=FIT_PARAM_ATOL, rtol=FIT_SATURATED_PARAM_RTOL)
        decided = np.abs(param_ref) > 1e-2
        np.testing.assert_array_equal(fit.q[decided], q_ref[decided])


@pytest.mark.parametrize("level", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 25), (1, 9, 17), (3, 11, 31), (16, 1, 25), (1, 20, 70),
                                   (2, 17, 80)])
def test_fit_rounding_without_param_drops_frozen_entries_keeping_the_rounding(shape, level, restore_isa):
    """Without return_param, AdaRound's element-wise loops drop the entries that can no longer
    change (saturated, momentum pointing outwards) and the products of the rest run on a
    packed copy; with it, every entry runs to the end. The roundings must be the same bits:
    on problems that saturate early (most entries frozen within a few iterations) and on
    ordinary ones over a whole schedule (warm start, then the regulariser), with k not a
    multiple of 16, one-row groups sharing a block and partly filled blocks."""
    if level not in kernels.supported_isas():
        pytest.skip(f"this CPU does not run {level}")
    kernels.set_isa(level)
    for problem, iterations, saturated in ((saturating_problem, 9, 0.9), (saturating_problem, 40, 0.8),
                                           (fit_problem, 300, 0.99)):
        w, s, a, t = problem(*shape)
        for keep_best in (False, True):
            every_entry = kernels.fit_rounding(w, s, a, t, -128, 127, iterations=iterations, keep_best=keep_best,
                                               return_param=True)
            if not keep_best:
                assert saturated_fraction(every_entry.param) >= saturated, (problem.__name__, iterations)
            packed = kernels.fit_rounding(w, s, a, t, -128, 127, iterations=iterations, keep_best=keep_best)
            assert packed.param is None
            np.testing.assert_array_equal(packed.q, every_entry.q, err_msg=f"{problem.__name__}, {iterations}")

