"""Validating wrappers around the C++ kernels: convert to the exact dtype and layout
(explicitly, here, so the bindings never copy behind one's back, and only where no value
changes: see "dtypes" below), allocate outputs, return named results. pyquant.reference
holds the numpy version of each.

Process-wide controls: set_num_threads (the kernels' share of the thread budget; small
inputs run on one thread anyway) and set_isa (which x86-64 level's copies of the hot
kernels run; every level gives the same bits)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import numpy as np
import numpy.typing as npt

# OpenMP threads waiting for work sleep instead of spinning (libgomp spins for about 3 ms by
# default, which on a busy machine takes the cores that the other processes, or onnxruntime
# in this one, need: a two-thread histogram ran 10-50x slower than one thread beside a CPU
# hog). libgomp reads this once, when it loads with the extension below; an explicit
# OMP_WAIT_POLICY in the environment wins. PASSIVE also sets libgomp's spin count to 0.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import _kernels  # noqa: E402  (after the environment above)
from ._kernels import RangeStats
from .config import CLE_MAX_SCALE, ENTROPY_QUANT_BINS  # noqa: E402
from .errors import ConfigError  # noqa: E402

__all__ = [
    "RangeStats", "CheckedAccumulate", "range_stats", "histogram_accumulate", "histogram_accumulate_if_in_range",
    "channel_sums", "channel_abs_max", "equalization_scales", "scale_channels", "histogram_rebin",
    "histogram_quant_errors", "tensor_quant_errors", "histogram_quantiles", "histogram_entropy_threshold",
    "RoundingAlgorithm", "RoundingOptions", "FitRounding", "fit_rounding", "gram_product", "gram_product_update",
    "window_gram",
    "set_num_threads", "get_num_threads", "isa", "set_isa", "supported_isas", "MAX_BINS",
]

# Upper bound of set_num_threads: far above any machine's cores, low enough to catch a typo.
MAX_THREADS = 1024


def set_num_threads(n: int) -> None:
    """Threads every later kernel call may use, process-wide (a share of the process's
    thread budget, see pyquant.threads). Inputs below a kernel's measured threshold still
    run on one thread. Default: the CPUs in this process's affinity mask at import."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_THREADS:
        raise ValueError(f"set_num_threads: n must be an integer in [1, {MAX_THREADS}], got {n!r}")
    _kernels.set_num_threads(int(n))


def get_num_threads() -> int:
    """Threads the kernels may use (see set_num_threads)."""
    return _kernels.get_num_threads()


def supported_isas() -> Tuple[str, ...]:
    """The x86-64 levels this CPU runs, best first: a subset of ("avx512", "avx2",
    "baseline") (x86-64-v4, x86-64-v3, x86-64)."""
    return tuple(_kernels.supported_isas())


def isa() -> str:
    """The level whose copies of the hot kernels run: the best supported one, unless
    set_isa or the environment variable PYQUANT_ISA (read at import) chose another."""
    return _kernels.isa()


def set_isa(name: str) -> None:
    """Run the copies of the hot kernels compiled for ``name`` ("avx512", "avx2" or
    "baseline"), process-wide; a level the CPU lacks is refused (ValueError)."""
    _kernels.set_isa(str(name))


if os.environ.get("PYQUANT_ISA"):
    try:
        set_isa(os.environ["PYQUANT_ISA"])
    except ValueError as e:
        raise ValueError(f"PYQUANT_ISA={os.environ['PYQUANT_ISA']}: {e}") from None


# ---- dtypes -------------------------------------------------------------------------------
# Each kernel computes in float32 or float64, or, for the statistics of a tensor, in either
# (the tensor's own). An argument of another dtype is converted only where no value can
# change: from bool, float16 and integers narrower than the mantissa (8- and 16-bit to
# float32, 32-bit to float64), and from a wider integer array (what Python ints become)
# when each of its values is exact. Anything else, float64 data for a float32 kernel first
# of all, is a TypeError that names the function, the argument and the dtype.

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
_MANTISSA_BITS = {F32: 24, F64: 53}
# Histograms have 1 to MAX_BINS bins (the bindings' bound, csrc/bindings.cc).
MAX_BINS: int = _kernels.MAX_BINS


def _exact_dtype(dtype: np.dtype, target: np.dtype) -> bool:
    """Whether every value of ``dtype`` is a value of the float type ``target``."""
    if dtype.kind == "b":
        return True
    if dtype.kind == "f":
        return dtype.itemsize <= target.itemsize
    if dtype.kind in "iu":
        return 8 * dtype.itemsize - (dtype.kind == "i") <= _MANTISSA_BITS[target]
    return False


def _exact_values(a: np.ndarray, target: np.dtype) -> bool:
    """Whether every value of the integer array ``a`` is a value of ``target``."""
    if a.dtype.kind not in "iu":
        return False
    limit = 2 ** _MANTISSA_BITS[target]
    return a.size == 0 or (-limit <= int(a.min()) and int(a.max()) <= limit)


def _real(x: npt.ArrayLike, function: str, name: str, dtypes: Tuple[np.dtype, ...] = (F32,)) -> np.ndarray:
    """``x`` as a C-contiguous array of one of ``dtypes``, the types ``function`` computes in
    (preferred first): as it is if it has one, else converted where no value changes."""
    a = np.asarray(x)
    if a.dtype in dtypes:
        return np.ascontiguousarray(a)
    for exact in (_exact_dtype(a.dtype, t) for t in dtypes), (_exact_values(a, t) for t in dtypes):
        for target, ok in zip(dtypes, exact):
            if ok:
                return np.ascontiguousarray(a, dtype=target)
    wanted = " or ".join(str(d) for d in dtypes)
    raise TypeError(f"{function}: {name} has dtype {a.dtype}, whose values {wanted} cannot all hold exactly; "
                    f"convert it explicitly if the rounding is intended")


def _bins(n: int, function: str, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_BINS:
        raise ValueError(f"{function}: {name} must be an integer in [1, {MAX_BINS}], got {n!r}")
    return int(n)


def _check_hist(hist: np.ndarray) -> None:
    if not (isinstance(hist, np.ndarray) and hist.dtype == np.float64 and hist.ndim == 1
            and hist.flags.c_contiguous):
        raise TypeError("hist must be a C-contiguous 1-D float64 numpy array (it is updated in place)")


# ---- tensor statistics (float32 or float64 data) ---------------------------------------------

def range_stats(x: npt.ArrayLike) -> RangeStats:
    """Finite min/max and NaN/+Inf/-Inf counts of a tensor of any shape (float32 or float64:
    min and max are values of the tensor)."""
    return _kernels.range_stats(_real(x, "range_stats", "x", (F32, F64)))


def histogram_accumulate(x: npt.ArrayLike, hist: np.ndarray, lo: float, hi: float) -> None:
    """Add the finite values of ``x`` to ``hist`` in place (equal bins over [lo, hi]; bin
    positions in x's precision, float32 or float64)."""
    _check_hist(hist)
    _kernels.histogram_accumulate(_real(x, "histogram_accumulate", "x", (F32, F64)), hist, float(lo), float(hi))


class CheckedAccumulate(NamedTuple):
    added: bool  # False: hist unchanged (a value was non-finite or outside [lo, hi])
    stats: RangeStats


def histogram_accumulate_if_in_range(x: npt.ArrayLike, hist: np.ndarray, lo: float, hi: float) -> CheckedAccumulate:
    """One pass over ``x``: its RangeStats, and its values added to ``hist`` only if all are
    finite and inside [lo, hi]."""
    _check_hist(hist)
    x = _real(x, "histogram_accumulate_if_in_range", "x", (F32, F64))
    checked = _kernels.histogram_accumulate_if_in_range(x, hist, float(lo), float(hi))
    return CheckedAccumulate(checked.added, checked.stats)


def channel_sums(x: npt.ArrayLike, sums: np.ndarray, channel_axis: int = 1) -> None:
    """``sums[c] += `` the sum of ``x`` over every axis but ``channel_axis`` (in place)."""
    x = _real(x, "channel_sums", "x", (F32, F64))
    if not (isinstance(sums, np.ndarray) and sums.dtype == np.float64 and sums.ndim == 1 and sums.flags.c_contiguous):
        raise TypeError("sums must be a C-contiguous 1-D float64 numpy array (it is updated in place)")
    if x.ndim == 0 or not -x.ndim <= channel_axis < x.ndim:
        raise ValueError(f"channel_axis {channel_axis} is out of range for shape {x.shape}")
    axis = channel_axis % x.ndim
    outer = int(np.prod(x.shape[:axis], dtype=np.int64))
    inner = int(np.prod(x.shape[axis + 1:], dtype=np.int64))
    _kernels.channel_sums(x.reshape(outer, x.shape[axis], inner), sums)


# ---- cross-layer equalization (float32 weights) --------------------------------------------

def channel_abs_max(w4: npt.ArrayLike) -> np.ndarray:
    """max |w[a, :, c, :]| for each (a, c) of a float32 tensor viewed as [A, B, C, D], as [A*C]."""
    w4 = _real(w4, "channel_abs_max", "w")
    if w4.ndim != 4:
        raise ValueError(f"w must be viewed as [A, B, C, D], got shape {w4.shape}")
    out = np.empty(w4.shape[0] * w4.shape[2], dtype=np.float32)
    _kernels.channel_abs_max(w4, out)
    return out


def equalization_scales(r1: npt.ArrayLike, r2: npt.ArrayLike, max_scale: float = CLE_MAX_SCALE,
                        act: Optional[npt.ArrayLike] = None, act_weight: float = 0.0) -> np.ndarray:
    """Cross-layer equalization scales sqrt(e / r2), 1 where a range is zero: e = r1, or
    with the activation's channel ranges ``act`` e = r1^(1-b) (rho act)^b, b = ``act_weight``
    (see csrc/kernels/cle.h). Computed in float64; the scales are float32, as the weights."""
    r1, r2 = _real(r1, "equalization_scales", "r1", (F64,)), _real(r2, "equalization_scales", "r2", (F64,))
    act = None if act is None else _real(act, "equalization_scales", "act", (F64,))
    out = np.empty(r1.shape, dtype=np.float32)
    _kernels.equalization_scales(r1, r2, act, float(act_weight), float(max_scale), out)
    return out


def scale_channels(w4: np.ndarray, s: npt.ArrayLike, divide: bool = False) -> None:
    """In place: w[a, :, c, :] *= s[a*C + c] (/= if divide); ``w4`` must be a C-contiguous
    float32 array (a reshaped view of the weight is fine)."""
    if not (isinstance(w4, np.ndarray) and w4.dtype == np.float32 and w4.flags.c_contiguous):
        raise TypeError("w must be a C-contiguous float32 numpy array (it is updated in place)")
    _kernels.scale_channels(w4, _real(s, "scale_channels", "s"), bool(divide))


# ---- histograms and scale search (float64) ---------------------------------------------------

def histogram_rebin(src: npt.ArrayLike, src_lo: float, src_hi: float,
                    dst_lo: float, dst_hi: float, dst_bins: int) -> np.ndarray:
    """``src`` re-binned onto ``dst_bins`` equal bins over [dst_lo, dst_hi]."""
    dst = np.zeros(_bins(dst_bins, "histogram_rebin", "dst_bins"), dtype=np.float64)
    _kernels.histogram_rebin(_real(src, "histogram_rebin", "src", (F64,)), float(src_lo), float(src_hi), dst,
                             float(dst_lo), float(dst_hi))
    return dst


def histogram_quant_errors(hist: npt.ArrayLike, lo: float, hi: float, scales: npt.ArrayLike,
                           zero_points: npt.ArrayLike, qmin: int, qmax: int) -> np.ndarray:
    """Total squared quantization error of the histogram's distribution for each candidate."""
    scales = np.atleast_1d(_real(scales, "histogram_quant_errors", "scales", (F64,)))
    zero_points = np.broadcast_to(_real(zero_points, "histogram_quant_errors", "zero_points", (F64,)),
                                  scales.shape).copy()
    out = np.empty_like(scales)
    _kernels.histogram_quant_errors(_real(hist, "histogram_quant_errors", "hist", (F64,)), float(lo), float(hi),
                                    scales, zero_points, float(qmin), float(qmax), out)
    return out


def tensor_quant_errors(x: npt.ArrayLike, scales: npt.ArrayLike, zero_points: npt.ArrayLike,
                        qmin: int, qmax: int) -> np.ndarray:
    """Exact squared error of each row of 2-D ``x`` (float32 or float64) for each of its
    candidates ([rows, ncand])."""
    x = _real(x, "tensor_quant_errors", "x", (F32, F64))
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [rows, cols], got shape {x.shape}")
    scales = _real(scales, "tensor_quant_errors", "scales", (F64,))
    if scales.ndim == 1:
        scales = np.ascontiguousarray(np.broadcast_to(scales, (x.shape[0], scales.shape[0])))
    zero_points = _real(zero_points, "tensor_quant_errors", "zero_points", (F64,))
    zero_points = np.ascontiguousarray(np.broadcast_to(zero_points, scales.shape))
    out = np.empty(scales.shape, dtype=np.float64)
    _kernels.tensor_quant_errors(x, scales, zero_points, float(qmin), float(qmax), out)
    return out


def histogram_quantiles(hist: npt.ArrayLike, lo: float, hi: float, qs: npt.ArrayLike) -> np.ndarray:
    """Values below which the fractions ``qs`` (in [0, 1]) of the histogram's mass lie."""
    qs = np.atleast_1d(_real(qs, "histogram_quantiles", "qs", (F64,)))
    out = np.empty_like(qs)
    _kernels.histogram_quantiles(_real(hist, "histogram_quantiles", "hist", (F64,)), float(lo), float(hi), qs, out)
    return out


def histogram_entropy_threshold(abs_hist: npt.ArrayLike, hi: float, num_quant_bins: int = ENTROPY_QUANT_BINS) -> float:
    """KL-divergence clipping threshold of a histogram of |x| over [0, hi]
    (1 <= num_quant_bins <= len(abs_hist))."""
    num_quant_bins = _bins(num_quant_bins, "histogram_entropy_threshold", "num_quant_bins")
    abs_hist = _real(abs_hist, "histogram_entropy_threshold", "abs_hist", (F64,))
    return _kernels.histogram_entropy_threshold(abs_hist, float(hi), num_quant_bins)


# ---- learned rounding (float32) --------------------------------------------------------------

RoundingAlgorithm = _kernels.RoundingAlgorithm  # AdaRound, AdaQuant; int() gives 0, 1
RoundingOptions = _kernels.RoundingOptions  # fit_rounding's settings, keyword-built and validated in C++
_DEFAULTS = RoundingOptions()  # the defaults, defined once (csrc/kernels/rounding.h)


def _algorithm(value) -> RoundingAlgorithm:
    """A RoundingAlgorithm from itself or its integer value (0 AdaRound, 1 AdaQuant)."""
    if isinstance(value, RoundingAlgorithm):
        return value
    members = {int(a): a for a in RoundingAlgorithm.__members__.values()}
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) not in members:
        raise ValueError(f"fit_rounding: algorithm must be one of {sorted(RoundingAlgorithm.__members__)} or its "
                         f"value {sorted(members)}, got {value!r}")
    return members[int(value)]


def _statistic(x: npt.ArrayLike, name: str) -> np.ndarray:
    """fit_rounding's loop runs in float32 (see csrc/kernels/rounding.h): its scale, Gram
    matrix and target, which callers accumulate in float64, are rounded to float32 unless a
    value would overflow; other dtypes as _real."""
    a = np.asarray(x)
    if a.dtype != F64:
        return _real(a, "fit_rounding", name)
    with np.errstate(over="ignore"):
        rounded = np.ascontiguousarray(a, dtype=F32)
    if np.any(np.isinf(rounded) & np.isfinite(a)):
        raise ValueError(f"fit_rounding: {name} has values beyond float32's range, the precision of its loop")
    return rounded


class FitRounding(NamedTuple):
    q: np.ndarray  # int8 [groups, rows, k]
    param: Optional[np.ndarray]  # the learned V / u when asked for (tests), else None


def fit_rounding(weight: npt.ArrayLike, scale: npt.ArrayLike, gram: npt.ArrayLike, target: npt.ArrayLike,
                 qmin: int, qmax: int, *, algorithm: RoundingAlgorithm = _DEFAULTS.algorithm,
                 iterations: int = _DEFAULTS.iterations, learning_rate: float = _DEFAULTS.learning_rate,
                 reg_param: float = _DEFAULTS.reg_param,
                 beta_range: Tuple[float, float] = (_DEFAULTS.beta_start, _DEFAULTS.beta_end),
                 warm_start: float = _DEFAULTS.warm_start, keep_best: bool = _DEFAULTS.keep_best,
                 return_param: bool = False) -> FitRounding:
    """Integer weights q (w~ = scale * q) minimising sum_r w~_r A w~_r^T - 2 w~_r . t_r per group.

    weight and target are [groups, rows, k] (or [rows, k] for one group), scale one value
    per row ([groups, rows], broadcast from a scalar), gram [groups, k, k] (or [k, k]).
    See csrc/kernels/rounding.h for the algorithms and the loss."""
    weight = _real(weight, "fit_rounding", "weight")
    target, gram = _statistic(target, "target"), _statistic(gram, "gram")
    if weight.ndim == 2:
        weight, target = weight[None], target[None]
        gram = gram[None] if gram.ndim == 2 else gram
    if weight.ndim != 3:
        raise ValueError(f"weight must be [groups, rows, k], got shape {weight.shape}")
    scale = np.ascontiguousarray(np.broadcast_to(_statistic(scale, "scale"), weight.shape[:2]))
    for name, a in (("weight", weight), ("scale", scale), ("gram", gram), ("target", target)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} has NaN or Inf values")
    beta_start, beta_end = beta_range
    options = RoundingOptions(algorithm=_algorithm(algorithm), iterations=int(iterations),
                              learning_rate=float(learning_rate), reg_param=float(reg_param),
                              beta_start=float(beta_start), beta_end=float(beta_end), warm_start=float(warm_start),
                              keep_best=bool(keep_best))
    out = np.empty(weight.shape, dtype=np.int8)
    param = np.empty(weight.shape, dtype=np.float32) if return_param else None
    _kernels.fit_rounding(weight, scale, gram, target, int(qmin), int(qmax), options, out, param)
    return FitRounding(out, param)


def gram_product(x: npt.ArrayLike, gram: npt.ArrayLike) -> np.ndarray:
    """x @ gram with the product kernel of fit_rounding (for tests and benchmarks)."""
    x, gram = _real(x, "gram_product", "x"), _real(gram, "gram_product", "gram")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [rows, k], got shape {x.shape}")
    out = np.empty_like(x)
    _kernels.gram_product(x, gram, out)
    return out


def gram_product_update(x_prev: npt.ArrayLike, x: npt.ArrayLike, gram: npt.ArrayLike, g: np.ndarray) -> None:
    """g += (x - x_prev) @ gram in place, adding gram's rows only where x differs from
    x_prev: fit_rounding's incremental product (for tests and benchmarks). g: a
    C-contiguous float32 array [rows, k]."""
    if not (isinstance(g, np.ndarray) and g.dtype == F32 and g.flags.c_contiguous):
        raise TypeError("g must be a C-contiguous float32 numpy array (it is updated in place)")
    x_prev, x = _real(x_prev, "gram_product_update", "x_prev"), _real(x, "gram_product_update", "x")
    gram = _real(gram, "gram_product_update", "gram")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [rows, k], got shape {x.shape}")
    _kernels.gram_product_update(x_prev, x, gram, g)


def window_gram(q: np.ndarray, f: Optional[np.ndarray], groups: int, kernel: Tuple[int, int], strides: Tuple[int, int],
                dilations: Tuple[int, int], pads: Tuple[int, int, int, int], qq: np.ndarray, qf: np.ndarray,
                ff: np.ndarray, sum_q: np.ndarray, sum_f: np.ndarray) -> int:
    """Add the Gram matrices of the convolution patches of ``q`` and ``f`` ([N, C, H, W])
    to the float64 accumulators qq/qf/ff [groups, K, K] and sum_q/sum_f [groups, K] in
    place (only qq and sum_q when ``f`` is None); returns the number of patches per group.
    pads: (top, left, bottom, right)."""
    for name, a in (("qq", qq), ("qf", qf), ("ff", ff), ("sum_q", sum_q), ("sum_f", sum_f)):
        if not (isinstance(a, np.ndarray) and a.dtype == np.float64 and a.flags.c_contiguous):
            raise TypeError(f"{name} must be a C-contiguous float64 numpy array (it is updated in place)")
    q = _real(q, "window_gram", "q")
    f = None if f is None else _real(f, "window_gram", "f")
    return _kernels.window_gram(q, f, int(groups), list(kernel), list(strides), list(dilations), list(pads),
                                qq, qf, ff, sum_q, sum_f)


def no_custom_ops_library() -> str:
    """The path of the onnxruntime custom-op library that registers no operator, built and
    installed beside the kernels (csrc/no_custom_ops.cc; pyquant.quark.get_library_path)."""
    folder = Path(_kernels.__file__).resolve().parent
    found = sorted(p for pattern in ("*pyquant_no_custom_ops*.so", "*pyquant_no_custom_ops*.dylib",
                                     "*pyquant_no_custom_ops*.dll") for p in folder.glob(pattern))
    if not found:
        raise ConfigError(f"the custom-op library pyquant_no_custom_ops is missing from {folder}: reinstall pyquant")
    return str(found[0])
