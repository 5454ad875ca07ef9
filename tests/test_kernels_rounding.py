"""fit_rounding's binding: an options object built from keywords and validated in C++, the
algorithm a pybind11 enum, named results; the Python signature stays as it was."""
import inspect

import numpy as np
import pytest

from pyquant import _kernels, kernels


def small_problem():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((2, 3, 5)) * 0.3).astype(np.float32)
    x = rng.standard_normal((2, 40, 5))
    gram = (np.einsum("gnk,gnj->gkj", x, x) / 40).astype(np.float32)
    target = np.einsum("gkj,grj->grk", gram, w).astype(np.float32)
    return w, np.full((2, 3), 0.02, np.float32), gram, target


def test_options_are_keyword_built_immutable_and_default_once():
    o = kernels.RoundingOptions()
    assert (o.algorithm, o.iterations, o.learning_rate, o.reg_param, o.beta_start, o.beta_end, o.warm_start,
            o.keep_best) == (kernels.RoundingAlgorithm.AdaRound, 1000, np.float32(0.1), np.float32(0.01), 20.0, 2.0,
                             0.2, True)
    o = kernels.RoundingOptions(algorithm=kernels.RoundingAlgorithm.AdaQuant, iterations=7, keep_best=False)
    assert (o.algorithm, o.iterations, o.keep_best) == (kernels.RoundingAlgorithm.AdaQuant, 7, False)
    assert "iterations=7" in repr(o) and "AdaQuant" in repr(o)
    with pytest.raises(TypeError):
        kernels.RoundingOptions(kernels.RoundingAlgorithm.AdaQuant, 7)  # keywords only
    with pytest.raises(AttributeError):
        o.iterations = 3
    # the wrapper's defaults are the options' defaults
    params = inspect.signature(kernels.fit_rounding).parameters
    defaults = kernels.RoundingOptions()
    assert params["iterations"].default == defaults.iterations
    assert params["learning_rate"].default == defaults.learning_rate
    assert params["beta_range"].default == (defaults.beta_start, defaults.beta_end)


@pytest.mark.parametrize("field,value,message", [
    ("iterations", -1, "iterations must be >= 0, got -1"),
    ("learning_rate", 0.0, "learning_rate must be finite and > 0"),
    ("learning_rate", float("inf"), "learning_rate must be finite and > 0"),
    ("reg_param", -0.1, "reg_param must be finite and >= 0"),
    ("beta_start", float("nan"), "beta_start and beta_end must be finite"),
    ("warm_start", 1.0, r"warm_start must be in \[0, 1\)"),
])
def test_options_refuse_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        kernels.RoundingOptions(**{field: value})


def test_algorithm_is_an_enum_whose_values_fit_rounding_still_accepts():
    a = kernels.RoundingAlgorithm
    assert set(a.__members__) == {"AdaRound", "AdaQuant"}
    assert (int(a.AdaRound), int(a.AdaQuant)) == (0, 1) and a(1) == a.AdaQuant
    w, s, g, t = small_problem()
    by_enum = kernels.fit_rounding(w, s, g, t, -128, 127, algorithm=a.AdaQuant, iterations=20, learning_rate=1e-3)
    by_int = kernels.fit_rounding(w, s, g, t, -128, 127, algorithm=1, iterations=20, learning_rate=1e-3)
    np.testing.assert_array_equal(by_enum.q, by_int.q)
    for bad in (2, -1, "AdaRound", 1.0, True):
        with pytest.raises(ValueError, match="fit_rounding: algorithm must be one of"):
            kernels.fit_rounding(w, s, g, t, -128, 127, algorithm=bad)


def test_binding_takes_the_options_object():
    w, s, g, t = small_problem()
    out, param = np.empty(w.shape, np.int8), np.empty(w.shape, np.float32)
    options = kernels.RoundingOptions(iterations=30)
    _kernels.fit_rounding(w, s, g, t, -128, 127, options, out, param)
    fit = kernels.fit_rounding(w, s, g, t, -128, 127, iterations=30, return_param=True)
    np.testing.assert_array_equal(out, fit.q)
    np.testing.assert_array_equal(param, fit.param)
    with pytest.raises(TypeError):  # the 16 positional arguments of before are gone
        _kernels.fit_rounding(w, s, g, t, -128, 127, 0, 30, 0.1, 0.01, 20.0, 2.0, 0.2, True, out, None)


def test_results_are_named():
    w, s, g, t = small_problem()
    fit = kernels.fit_rounding(w, s, g, t, -128, 127, iterations=5)
    assert fit._fields == ("q", "param") and fit.q.dtype == np.int8 and fit.param is None
    checked = kernels.histogram_accumulate_if_in_range(np.ones(10, np.float32), np.zeros(4), 0, 2)
    assert checked._fields == ("added", "stats") and checked.added and checked.stats.finite == 10
    raw = _kernels.histogram_accumulate_if_in_range(np.ones(10, np.float32), np.zeros(4), 0, 2)
    assert raw.added and raw.stats.max == 1.0

