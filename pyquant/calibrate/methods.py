"""Calibration methods: from collected statistics to quantization parameters.

Each method is a function registered under its enum member (no string dispatch).
Float methods choose a clipping range; power-of-two methods choose an exponent k and
use scale 2^k. Errors are the closed-form expected squared error of the histogram
(pyquant.kernels.histogram_quant_errors) or, for weights, the exact error.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from .. import kernels
from ..config import ENTROPY_QUANT_BINS, CalibrateMethod, CalibrationMethod, PowerOfTwoMethod, QuantConfig, QuantType
from ..qparams import QParams
from .collector import TensorCollector

# Power-of-two search: exponents from the non-overflowing one down by this many.
# Each step halves the step size and doubles the clipping risk; 16 steps cover a
# 65536x range, far beyond any useful clipping of an 8-bit tensor.
POW2_SEARCH_STEPS = 16
# Float MSE search: candidate clipping ranges alpha * [min, max], alpha on this grid.
MSE_SEARCH_POINTS = 200
MSE_SEARCH_MIN_FRACTION = 0.02
# Scale used for an all-zero tensor (any positive value represents it exactly).
ZERO_TENSOR_SCALE = 1.0


@dataclasses.dataclass(frozen=True)
class _Grid:
    """The integer grid of a tensor: zero point, clamp limits and positive levels."""

    zero_point: int
    qmin: int
    qmax: int

    @property
    def levels(self) -> int:  # steps from zero to the largest representable magnitude
        return min(self.qmax - self.zero_point, self.zero_point - self.qmin) \
            if self.zero_point > self.qmin else self.qmax - self.zero_point


def _symmetric_grid(qtype: QuantType, non_negative: bool) -> _Grid:
    """Unsigned types put the zero point at 0 for a non-negative tensor, mid-range (128 for
    uint8) otherwise; signed types at 0."""
    if not qtype.signed:
        return _Grid(0 if non_negative else (qtype.qmax + 1) // 2, qtype.qmin, qtype.qmax)
    return _Grid(0, qtype.qmin, qtype.qmax)


def _make(scale: float, zero_point: int, qtype: QuantType) -> QParams:
    if not (scale > 0 and math.isfinite(scale)):
        scale = ZERO_TENSOR_SCALE
    return QParams(np.array(scale, dtype=np.float32), np.array(zero_point, dtype=qtype.numpy_dtype))


def qparams_from_range(rmin: float, rmax: float, qtype: QuantType, symmetric: bool) -> QParams:
    """Standard affine parameters for a clipping range (widened to include zero)."""
    rmin, rmax = min(rmin, 0.0), max(rmax, 0.0)
    if symmetric:
        grid = _symmetric_grid(qtype, rmin >= 0)
        return _make(max(-rmin, rmax) / grid.levels, grid.zero_point, qtype)
    scale = (rmax - rmin) / (qtype.qmax - qtype.qmin)
    if scale <= 0:
        return _make(ZERO_TENSOR_SCALE, 0 if qtype.signed else qtype.qmin, qtype)
    zero_point = int(np.clip(round(qtype.qmin - rmin / scale), qtype.qmin, qtype.qmax))
    return _make(scale, zero_point, qtype)


# ---- activation methods: (collector, config) -> QParams ------------------------------

def _minmax(c: TensorCollector, cfg: QuantConfig) -> QParams:
    return qparams_from_range(c.min, c.max, cfg.activation_type, cfg.activation_symmetric)


def _percentile(c: TensorCollector, cfg: QuantConfig) -> QParams:
    p = cfg.percentile / 100.0
    if cfg.activation_symmetric:
        mag, hi = c.magnitude_histogram()
        t = float(kernels.histogram_quantiles(mag, 0.0, hi, [p])[0])
        return qparams_from_range(max(c.min, -t), min(c.max, t), cfg.activation_type, True)
    lo, hi = kernels.histogram_quantiles(c.hist, c.lo, c.hi, [1.0 - p, p])
    return qparams_from_range(max(c.min, lo), min(c.max, hi), cfg.activation_type, False)


def _entropy(c: TensorCollector, cfg: QuantConfig) -> QParams:
    mag, hi = c.magnitude_histogram()
    if hi <= 0:
        return _minmax(c, cfg)
    t = kernels.histogram_entropy_threshold(mag, hi, ENTROPY_QUANT_BINS)
    return qparams_from_range(max(c.min, -t), min(c.max, t), cfg.activation_type, cfg.activation_symmetric)


def _best_of(c: TensorCollector, candidates: list, qtype: QuantType) -> QParams:
    scales = np.array([float(q.scale) for q in candidates])
    zps = np.array([float(q.zero_point) for q in candidates])
    errors = kernels.histogram_quant_errors(c.hist, c.lo, c.hi, scales, zps, qtype.qmin, qtype.qmax)
    return candidates[int(np.argmin(errors))]


def _mse(c: TensorCollector, cfg: QuantConfig) -> QParams:
    """Clipping range alpha * [min, max] with the least expected squared error."""
    if c.count == 0 or c.abs_max == 0:
        return _minmax(c, cfg)
    alphas = np.linspace(MSE_SEARCH_MIN_FRACTION, 1.0, MSE_SEARCH_POINTS)
    candidates = [qparams_from_range(a * c.min, a * c.max, cfg.activation_type, cfg.activation_symmetric)
                  for a in alphas]
    return _best_of(c, candidates, cfg.activation_type)


def _pow2_candidates(abs_max: float, grid: _Grid, steps: int) -> Tuple[np.ndarray, int]:
    """Exponents [k_no - steps, k_no]; k_no is the smallest that does not clip abs_max."""
    k_no = math.ceil(math.log2(abs_max / grid.levels))
    return np.arange(k_no - steps, k_no + 1), k_no


def _pow2_activation(c: TensorCollector, cfg: QuantConfig, search: bool) -> QParams:
    qtype = cfg.activation_type
    grid = _symmetric_grid(qtype, c.min >= 0)
    if c.count == 0 or c.abs_max == 0:
        return _make(ZERO_TENSOR_SCALE, grid.zero_point, qtype)
    exponents, k_no = _pow2_candidates(c.abs_max, grid, POW2_SEARCH_STEPS if search else 0)
    if not search:
        return _make(2.0 ** k_no, grid.zero_point, qtype)
    scales = np.exp2(exponents.astype(np.float64))
    errors = kernels.histogram_quant_errors(c.hist, c.lo, c.hi, scales, grid.zero_point, grid.qmin, grid.qmax)
    return _make(float(scales[int(np.argmin(errors))]), grid.zero_point, qtype)


ACTIVATION_METHODS: Dict[CalibrateMethod, Callable[[TensorCollector, QuantConfig], QParams]] = {
    CalibrationMethod.MinMax: _minmax,
    CalibrationMethod.Percentile: _percentile,
    CalibrationMethod.Entropy: _entropy,
    CalibrationMethod.MSE: _mse,
    PowerOfTwoMethod.NonOverflow: lambda c, cfg: _pow2_activation(c, cfg, search=False),
    PowerOfTwoMethod.MinMSE: lambda c, cfg: _pow2_activation(c, cfg, search=True),
}


def activation_qparams(collector: TensorCollector, config: QuantConfig, unclipped: bool = False) -> QParams:
    """Quantization parameters of an activation tensor from its collected statistics;
    ``unclipped``: its whole range (QuantConfig.unclipped_output_layers), MinMax or, with
    power-of-two scales, NonOverflow."""
    if unclipped:
        method = PowerOfTwoMethod.NonOverflow if config.power_of_two else CalibrationMethod.MinMax
        return ACTIVATION_METHODS[method](collector, config)
    return ACTIVATION_METHODS[config.calibrate_method](collector, config)


def bulk_sqnr_db(c: TensorCollector, qp: QParams, qtype: QuantType, quantile: float) -> float:
    """Expected SQNR (dB) with ``qp`` of the tensor's bulk: its values up to the
    ``quantile`` of |x| (from the histogram; bins are taken whole, by their centres).
    10 log10(sum x^2 / sum (x - q(x))^2) over those values. inf when there is nothing to
    judge: no histogram (MinMax collects none), an all-zero bulk, or no error."""
    if c.hist is None or c.count == 0:
        return math.inf
    edges = np.linspace(c.lo, c.hi, len(c.hist) + 1)
    centers = (edges[1:] + edges[:-1]) / 2
    magnitude = np.abs(centers)
    order = np.argsort(magnitude, kind="stable")
    cumulative = np.cumsum(c.hist[order])
    limit = magnitude[order][min(int(np.searchsorted(cumulative, quantile * cumulative[-1])), len(order) - 1)]
    bulk = np.where(magnitude <= limit, c.hist, 0.0)
    signal = float(np.sum(bulk * centers ** 2))
    error = float(kernels.histogram_quant_errors(bulk, c.lo, c.hi, np.array([float(qp.scale)]),
                                                 float(qp.zero_point), qtype.qmin, qtype.qmax)[0])
    if signal <= 0 or error <= 0:
        return math.inf
    return 10.0 * math.log10(signal / error)


# ---- weights -------------------------------------------------------------------------

def weight_qparams(weight: np.ndarray, config: QuantConfig, axis: Optional[int] = None) -> QParams:
    """Symmetric int8 parameters of a weight tensor (zero point 0); for uint8 weights the
    asymmetric min..max parameters (_asymmetric_weight_qparams).

    Float scales, per tensor or per channel along ``axis``: abs-max / 127, or per tensor
    with ``config.weight_scale_mse`` c * abs-max / 127 with the clipping ratio c in [0.3, 1]
    that gives the least exact squared rounding error (_least_error_ratios). Measured on
    EfficientNet-Lite0 (KL divergence from the float model on val): clipping helps per
    tensor, where it buys resolution for the many channels far below the largest one
    (U8S8 0.065 -> 0.054), and hurts per channel, where each channel already has its own
    resolution and clipping only cuts its largest, most influential weights (U8S8 0.0046
    -> 0.0056, A8W8 0.0054 -> 0.0065); so per-channel scales stay abs max. Not under fast
    finetune either: AdaRound moves a weight by at most one step, so a clipped weight would
    stay clipped (measured: INT8_CNN_ACCURATE 86.8 % top-1 with clipping, 87.6 % without).
    Power-of-two scales (per tensor): NonOverflow takes the smallest 2^k that does not
    clip; MinMSE the 2^k with the least exact squared error over the whole tensor.
    """
    qtype = config.weight_type
    w = np.asarray(weight, dtype=np.float32)
    if not qtype.signed:
        return _asymmetric_weight_qparams(w, qtype, axis)
    if config.power_of_two:
        grid = _symmetric_grid(qtype, non_negative=False)
        abs_max = float(np.max(np.abs(w))) if w.size else 0.0
        if abs_max == 0:
            return _make(ZERO_TENSOR_SCALE, 0, qtype)
        search = config.calibrate_method is PowerOfTwoMethod.MinMSE
        exponents, k_no = _pow2_candidates(abs_max, grid, POW2_SEARCH_STEPS if search else 0)
        if not search:
            return _make(2.0 ** k_no, 0, qtype)
        scales = np.exp2(exponents.astype(np.float64))
        errors = kernels.tensor_quant_errors(w.reshape(1, -1), scales, 0.0, grid.qmin, grid.qmax)[0]
        return _make(float(scales[int(np.argmin(errors))]), 0, qtype)
    rows = w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    abs_max = np.max(np.abs(rows), axis=1) if rows.shape[1] else np.zeros(rows.shape[0])
    ratio = np.ones(abs_max.shape)
    if config.weight_scale_mse and axis is None and config.fast_finetune is None and rows.size:
        ratio = _least_error_ratios(rows / np.where(abs_max > 0, abs_max, 1.0)[:, None], qtype)
    scale = (abs_max * ratio / 127.0).astype(np.float32)
    if axis is None:
        return _make(float(scale[0]), 0, qtype)
    scale = np.where(abs_max > 0, scale, ZERO_TENSOR_SCALE).astype(np.float32)
    return QParams(scale, np.zeros(scale.shape, dtype=qtype.numpy_dtype), axis)


def _asymmetric_weight_qparams(w: np.ndarray, qtype: QuantType, axis: Optional[int]) -> QParams:
    """Unsigned weights (QUInt8): the affine parameters of each tensor's (or channel's)
    min..max range widened to include zero, so that zero is exact (padding, pruned weights)."""
    if axis is None:
        return qparams_from_range(float(w.min()) if w.size else 0.0, float(w.max()) if w.size else 0.0, qtype,
                                  symmetric=False)
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    per_row = [qparams_from_range(float(r.min()) if r.size else 0.0, float(r.max()) if r.size else 0.0, qtype,
                                  symmetric=False) for r in rows]
    return QParams(np.array([p.scale for p in per_row], dtype=np.float32),
                   np.array([p.zero_point for p in per_row], dtype=qtype.numpy_dtype), axis)


# Clipping ratios searched for float weight scales: a coarse grid, then a fine one around
# the best coarse ratio (the error is smooth in the ratio at this resolution).
_COARSE_RATIOS = np.linspace(0.3, 1.0, 36)
_FINE_OFFSETS = np.linspace(-0.02, 0.02, 21)


def _least_error_ratios(normalized: np.ndarray, qtype: QuantType) -> np.ndarray:
    """Per row of ``normalized`` (abs max 1 or all zero), the ratio c with the least exact
    squared error when quantized with scale c / 127 (symmetric, zero point 0)."""
    rows = np.ascontiguousarray(normalized, dtype=np.float32)
    errors = kernels.tensor_quant_errors(rows, _COARSE_RATIOS / 127.0, 0.0, qtype.qmin, qtype.qmax)
    best = _COARSE_RATIOS[np.argmin(errors, axis=1)]
    fine = np.clip(best[:, None] + _FINE_OFFSETS[None, :], _COARSE_RATIOS[0], 1.0)
    errors = kernels.tensor_quant_errors(rows, fine / 127.0, 0.0, qtype.qmin, qtype.qmax)
    return fine[np.arange(rows.shape[0]), np.argmin(errors, axis=1)]
