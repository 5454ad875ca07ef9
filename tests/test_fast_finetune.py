"""Fast finetune: the C++ rounding loop against its numpy reference, the Gram kernels
against im2col in numpy, and the technique end to end on a tiny CNN."""
import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pyquant import kernels, reference
from pyquant.cli import main
from pyquant.compat import DEFAULT_ADAQUANT_PARAMS, DEFAULT_ADAROUND_PARAMS, QuantizationConfig, get_default_config
from pyquant.config import FastFinetuneOptions, FinetuneAlgorithm, get_preset
from pyquant.data import ArrayReader
from pyquant.errors import ConfigError, DataError
from pyquant.pipeline import quantize_model
from pyquant.techniques.fast_finetune.gram import GramAccumulator, LinearLayer


def layer_problem(groups, rows, k, seed=0, n=300, noise=0.05):
    """A layer's weights, per-row scales, and the Gram form of its loss on random inputs.
    The target is the float layer on float inputs x (the soft-rounded start has a non-zero
    gradient; with target A w it is zero up to round-off, and Adam follows the round-off)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((groups, n, k))
    xq = x + noise * rng.standard_normal(x.shape)
    w = (rng.standard_normal((groups, rows, k)) * 0.3).astype(np.float32)
    gram = np.einsum("gnk,gnj->gkj", xq, xq) / n
    target = np.einsum("gkj,grj->grk", np.einsum("gnk,gnj->gkj", xq, x) / n, w)
    scale = (np.abs(w).max(axis=2) / 127 * rng.uniform(1, 8, (groups, rows))).astype(np.float32)
    return w, scale, gram.astype(np.float32), target.astype(np.float32)


SHAPES = {"dense": (1, 24, 40), "conv": (2, 6, 27), "depthwise": (16, 1, 9)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("algorithm,lr", [(kernels.RoundingAlgorithm.AdaRound, 0.1),
                                          (kernels.RoundingAlgorithm.AdaQuant, 1e-3)])
def test_fit_rounding_matches_reference_for_a_few_iterations(shape, algorithm, lr):
    w, s, a, t = layer_problem(*SHAPES[shape])
    for iterations in (1, 5, 10):
        fit = kernels.fit_rounding(w, s, a, t, -128, 127, algorithm=algorithm, iterations=iterations,
                                   learning_rate=lr, keep_best=False, return_param=True)
        q_ref, param_ref = reference.fit_rounding(w, s, a, t, -128, 127, algorithm=int(algorithm),
                                                  iterations=iterations, learning_rate=lr, keep_best=False)
        # float32 against float64: the parameters agree to 1e-3 of their own scale
        tolerance = 1e-3 * (1.0 if algorithm == kernels.RoundingAlgorithm.AdaRound else float(np.abs(w).max()))
        np.testing.assert_allclose(fit.param, param_ref, atol=tolerance)
        decided = np.abs(param_ref) > 1e-2 if algorithm == kernels.RoundingAlgorithm.AdaRound else slice(None)
        np.testing.assert_array_equal(fit.q[decided], q_ref[decided])


@pytest.mark.parametrize("shape", SHAPES)
def test_adaround_lowers_the_output_error_below_nearest_rounding(shape):
    w, s, a, t = layer_problem(*SHAPES[shape], seed=3)
    nearest = np.clip(np.round(w / s[..., None]), -128, 127)
    q = kernels.fit_rounding(w, s, a, t, -128, 127, iterations=500).q
    before = reference.rounding_error(nearest, s, a, t)
    after = reference.rounding_error(q, s, a, t)
    assert np.all(after <= before + 1e-9 * np.abs(before))  # early stop: never worse, row by row
    assert after.sum() < before.sum() - 1e-6 * abs(before.sum())
    assert np.all(np.abs(q.astype(int) - w / s[..., None]) < 1.0 + 1e-6)  # only floor or ceil


def test_final_weights_are_integers_in_range_and_clamped():
    w, s, a, t = layer_problem(1, 8, 16, seed=5)
    s = s / 20  # most weights fall outside a [-4, 3] grid
    for algorithm, lr in ((kernels.RoundingAlgorithm.AdaRound, 0.1), (kernels.RoundingAlgorithm.AdaQuant, 1e-4)):
        q = kernels.fit_rounding(w, s, a, t, -4, 3, algorithm=algorithm, iterations=50, learning_rate=lr).q
        assert q.dtype == np.int8 and q.min() >= -4 and q.max() <= 3


def test_soft_rounding_h_stays_in_unit_interval():
    w, s, a, t = layer_problem(1, 4, 16, seed=6)
    fit = kernels.fit_rounding(w, s, a, t, -128, 127, iterations=200, return_param=True)
    sig = 1 / (1 + np.exp(-fit.param.astype(np.float64)))
    h = np.clip(sig * (reference.ADAROUND_ZETA - reference.ADAROUND_GAMMA) + reference.ADAROUND_GAMMA, 0, 1)
    assert np.all((h >= 0) & (h <= 1)) and np.all(np.isfinite(fit.param))
    # annealing to beta=2 leaves almost every weight decided (h near 0 or 1)
    assert np.mean((h < 0.05) | (h > 0.95)) > 0.9


def test_fit_rounding_is_deterministic():
    w, s, a, t = layer_problem(3, 10, 50, seed=7)
    first = kernels.fit_rounding(w, s, a, t, -128, 127, iterations=100, return_param=True)
    second = kernels.fit_rounding(w, s, a, t, -128, 127, iterations=100, return_param=True)
    np.testing.assert_array_equal(first.q, second.q)
    np.testing.assert_array_equal(first.param, second.param)


def test_zero_iterations_is_nearest_rounding():
    w, s, a, t = layer_problem(1, 6, 20, seed=8)
    q = kernels.fit_rounding(w, s, a, t, -128, 127, iterations=0).q
    nearest = np.clip(np.round(w / s[..., None]), -128, 127)
    assert np.mean(q == nearest) > 0.99  # ties (frac = 0.5) may round up instead of to even


def test_fit_rounding_rejects_bad_arrays():
    w, s, a, t = layer_problem(1, 4, 8)
    with pytest.raises(ValueError, match="NaN"):
        kernels.fit_rounding(w, s, np.full_like(a, np.nan), t, -128, 127)
    with pytest.raises(ValueError, match="scale"):
        kernels.fit_rounding(w, np.zeros_like(s), a, t, -128, 127)
    with pytest.raises(ValueError, match="gram"):
        kernels.fit_rounding(w, s, a[:, :4, :4], t, -128, 127)
    with pytest.raises(ValueError, match="qmin"):
        kernels.fit_rounding(w, s, a, t, 5, 5)
    empty = kernels.fit_rounding(np.zeros((1, 0, 8), np.float32), np.ones((1, 0)), a, np.zeros((1, 0, 8)), -128, 127)
    assert empty.q.shape == (1, 0, 8)


@pytest.mark.parametrize("rows,k", [(1, 1), (3, 9), (17, 33), (64, 100)])
def test_gram_product_matches_numpy(rows, k):
    rng = np.random.default_rng(rows * k)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    a = rng.standard_normal((k, k)).astype(np.float32)
    np.testing.assert_allclose(kernels.gram_product(x, a), x.astype(np.float64) @ a, rtol=1e-4, atol=1e-4)
    # a non-contiguous view is copied by the wrapper, not misread
    xt = np.asfortranarray(x)
    np.testing.assert_allclose(kernels.gram_product(xt, a), x.astype(np.float64) @ a, rtol=1e-4, atol=1e-4)


def conv_layer(c, o, groups, kernel, stride, pad, dilation=1, seed=0):
    w = np.random.default_rng(seed).standard_normal((groups, o // groups, c // groups * kernel * kernel))
    return LinearLayer(None, "conv", "w", w.astype(np.float32), (o, c // groups, kernel, kernel), False, 2,
                       kernel=(kernel, kernel), strides=(stride, stride), dilations=(dilation, dilation),
                       pads=(pad, pad, pad, pad))


@pytest.mark.parametrize("c,o,groups,kernel,stride,pad,dilation", [
    (8, 8, 8, 5, 2, 2, 1), (3, 16, 1, 3, 2, 1, 1), (8, 8, 8, 3, 1, 1, 1), (4, 8, 2, 3, 1, 0, 1),
    (6, 6, 6, 3, 1, 2, 2), (2, 4, 1, 1, 2, 0, 1)])
def test_window_gram_matches_im2col(c, o, groups, kernel, stride, pad, dilation):
    layer = conv_layer(c, o, groups, kernel, stride, pad, dilation)
    rng = np.random.default_rng(1)
    xq = rng.standard_normal((3, c, 11, 9)).astype(np.float32)
    fast, slow = GramAccumulator(groups, layer.k), GramAccumulator(groups, layer.k)
    fast.update_layer(layer, xq)  # C++ window Grams (or numpy for a pointwise layer)
    slow.update(layer.patches(xq))  # numpy im2col and matmul
    assert fast.count == slow.count
    for name in ("qq", "sum_q"):
        np.testing.assert_allclose(getattr(fast, name), getattr(slow, name), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("groups,m,k", [(1, 300, 37), (1, 1, 5), (1, 0, 4), (3, 50, 9)])
def test_gram_accumulator_sums_patch_products_in_float64(groups, m, k):
    rng = np.random.default_rng(4)
    batches = [rng.standard_normal((groups, m, k)).astype(np.float32) * scale for scale in (1.0, 1e3)]
    acc = GramAccumulator(groups, k)
    for pq in batches:
        acc.update(pq)
    want = sum(np.einsum("gmi,gmj->gij", pq.astype(np.float64), pq.astype(np.float64)) for pq in batches)
    # float32 products of each batch: errors relative to the largest entry (cancellation)
    np.testing.assert_allclose(acc.qq, want, rtol=0, atol=1e-5 * max(np.abs(want).max(), 1.0))
    np.testing.assert_array_equal(acc.qq, acc.qq.transpose(0, 2, 1))  # both triangles written
    np.testing.assert_allclose(acc.sum_q, sum(pq.sum(axis=1, dtype=np.float64) for pq in batches), rtol=1e-6)
    assert acc.count == 2 * m


def test_im2col_patches_reproduce_the_convolution():
    layer = conv_layer(8, 8, 8, 5, 2, 2, seed=2)
    x = np.random.default_rng(3).standard_normal((2, 8, 11, 11)).astype(np.float32)
    w = layer.weight.reshape(layer.onnx_shape)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"], group=8, strides=[2, 2], pads=[2, 2, 2, 2])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8, 11, 11])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(w, "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    out = np.einsum("gmk,grk->gmr", layer.patches(x), layer.weight)
    out = out.reshape(8, 2, 6, 6, 1).transpose(1, 0, 4, 2, 3).reshape(y.shape)
    np.testing.assert_allclose(out, y, rtol=1e-4, atol=1e-4)


def output_mse(model, quantized, x):
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return float(np.mean((run(model) - run(quantized)) ** 2))


def test_tiny_cnn_improves_with_fast_finetune(tiny_model, tiny_data):
    plain = dataclasses.replace(get_preset("XINT8"), bias_correction=False)
    finetuned = dataclasses.replace(plain, fast_finetune=FastFinetuneOptions(iterations=300))
    base = quantize_model(tiny_model, ArrayReader(tiny_data, "x", 8), plain)
    result = quantize_model(tiny_model, ArrayReader(tiny_data, "x", 8), finetuned)
    onnx.checker.check_model(result.model)
    report = result.reports["fast_finetune"]
    assert [r.name for r in report.layers] == ["Conv(bn1)", "Conv(c2)", "Conv(c3)", "Gemm(y)"]
    assert all(r.error_after <= r.error_before for r in report.layers)
    assert output_mse(tiny_model, result.model, tiny_data) < output_mse(tiny_model, base.model, tiny_data)
    again = quantize_model(tiny_model, ArrayReader(tiny_data, "x", 8), finetuned)
    assert again.model.SerializeToString() == result.model.SerializeToString()  # bit-identical


def test_fast_finetune_needs_a_rewindable_reader(tiny_model, tiny_data):
    class OneShot:
        def __init__(self):
            self.batches = [{"x": tiny_data[i:i + 8]} for i in range(0, 64, 8)]

        def get_next(self):
            return self.batches.pop(0) if self.batches else None

    config = dataclasses.replace(get_preset("XINT8"), fast_finetune=FastFinetuneOptions(iterations=1))
    with pytest.raises(DataError, match="rewind"):
        quantize_model(tiny_model, OneShot(), config)


def test_quark_fast_finetune_options():
    accurate = get_default_config("INT8_CNN_ACCURATE")
    assert accurate.include_fast_ft and accurate.to_quant_config() == get_preset("INT8_CNN_ACCURATE")
    adaquant = QuantizationConfig(include_fast_ft=True, extra_options={"FastFinetune": dict(DEFAULT_ADAQUANT_PARAMS)})
    options = adaquant.to_quant_config().fast_finetune
    assert options.algorithm is FinetuneAlgorithm.AdaQuant and options.learning_rate == 1e-5
    assert QuantizationConfig(include_fast_ft=True).to_quant_config().fast_finetune.iterations == \
        DEFAULT_ADAROUND_PARAMS["NumIterations"]
    with pytest.raises(ConfigError, match="NumIteration"):
        QuantizationConfig(include_fast_ft=True, extra_options={"FastFinetune": {"NumIteration": 5}}).to_quant_config()
    with pytest.raises(ConfigError, match="cpu"):
        QuantizationConfig(include_fast_ft=True, extra_options={"FastFinetune": {"OptimDevice": "cuda:0"}}).to_quant_config()
    with pytest.raises(ConfigError, match="include_fast_ft"):
        QuantizationConfig(extra_options={"FastFinetune": {"NumIterations": 5}}).to_quant_config()
    with pytest.raises(ConfigError, match="adaround"):
        QuantizationConfig(include_fast_ft=True, extra_options={"FastFinetune": {"OptimAlgorithm": "sgd"}}).to_quant_config()


def test_cli_fast_finetune(tmp_path, tiny_model_path, tiny_data):
    np.save(tmp_path / "calib.npy", tiny_data)
    out = tmp_path / "q.onnx"
    assert main(["quantize", "--model_input", str(tiny_model_path), "--model_output", str(out), "--calib_data",
                 str(tmp_path / "calib.npy"), "--quiet", "--fast_finetune"]) == 0
    onnx.checker.check_model(onnx.load(out))


@pytest.mark.parametrize("key,value,field,expected", [
    ("OptimAlgorithm", "AdaQuant", "algorithm", FinetuneAlgorithm.AdaQuant),
    ("NumIterations", 20, "iterations", 20),
    ("LearningRate", 0.05, "learning_rate", 0.05),
    ("RegParam", 0.1, "reg_param", 0.1),
    ("BetaRange", (10, 3), "beta_range", (10.0, 3.0)),
    ("WarmStart", 0.1, "warm_start", 0.1),
    ("FallbackToNearest", False, "early_stop", False),
    ("UpdateBias", False, "update_bias", False),
    ("DataSize", 64, "data_size", 64),
    ("DataBatches", 3, "data_batches", 3),
    ("NumIterations", 12.0, "iterations", 12),
])
def test_every_fast_finetune_key_maps_to_the_typed_options(key, value, field, expected):
    options = QuantizationConfig(include_fast_ft=True, extra_options={"FastFinetune": {key: value}}) \
        .to_quant_config().fast_finetune
    assert getattr(options, field) == expected


def test_the_model_does_not_depend_on_the_thread_budget(tiny_model, tiny_data):
    config = dataclasses.replace(get_preset("XINT8"), fast_finetune=FastFinetuneOptions(iterations=100))
    one = quantize_model(tiny_model, ArrayReader(tiny_data, "x", 8), dataclasses.replace(config, threads=1))
    two = quantize_model(tiny_model, ArrayReader(tiny_data, "x", 8), dataclasses.replace(config, threads=2))
    assert one.model.SerializeToString() == two.model.SerializeToString()
