"""Plain numpy versions of every C++ kernel, written for clarity rather than speed.

The tests check pyquant.kernels against these; they can also stand in for the
kernels when debugging. Formulas match csrc/kernels/*.h.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .config import CLE_MAX_SCALE, ENTROPY_QUANT_BINS


class RangeStatsRef(NamedTuple):
    finite: int
    nan: int
    pos_inf: int
    neg_inf: int
    min: float
    max: float


def _tensor(x: np.ndarray) -> np.ndarray:
    """x flattened in the type a statistics kernel computes in: float64 stays, the rest float32."""
    x = np.asarray(x)
    return (x if x.dtype == np.float64 else x.astype(np.float32)).ravel()


def range_stats(x: np.ndarray) -> RangeStatsRef:
    x = _tensor(x)
    finite = x[np.isfinite(x)]
    return RangeStatsRef(
        finite=int(finite.size), nan=int(np.isnan(x).sum()),
        pos_inf=int(np.isposinf(x).sum()), neg_inf=int(np.isneginf(x).sum()),
        min=float(finite.min()) if finite.size else float("inf"),
        max=float(finite.max()) if finite.size else float("-inf"))


def histogram_accumulate(x: np.ndarray, hist: np.ndarray, lo: float, hi: float) -> None:
    x = _tensor(x)
    x = x[np.isfinite(x)]
    nbins = hist.shape[0]
    real = x.dtype.type
    pos = (x - real(lo)) * real(nbins / (hi - lo))  # in x's precision, as the kernel
    idx = np.clip(pos, 0, nbins - 1).astype(np.int64)
    hist += np.bincount(idx, minlength=nbins)


def histogram_accumulate_if_in_range(x: np.ndarray, hist: np.ndarray, lo: float, hi: float):
    stats = range_stats(x)
    fits = stats.nan == stats.pos_inf == stats.neg_inf == 0 and (stats.finite == 0 or lo <= stats.min and stats.max <= hi)
    if fits:
        histogram_accumulate(x, hist, lo, hi)
    return fits, stats


def channel_sums(x: np.ndarray, sums: np.ndarray, channel_axis: int = 1) -> None:
    x = np.asarray(x, dtype=np.float64)
    axes = tuple(a for a in range(x.ndim) if a != channel_axis % x.ndim)
    sums += x.sum(axis=axes)


def channel_abs_max(w4: np.ndarray) -> np.ndarray:
    """max |w[a, :, c, :]|, NaN ignored (fmax), 0 for an empty slice."""
    w4 = np.abs(np.asarray(w4, dtype=np.float32))
    return np.fmax.reduce(w4, axis=(1, 3), initial=np.float32(0)).reshape(-1)


def equalization_scales(r1, r2, max_scale: float = CLE_MAX_SCALE, act=None, act_weight: float = 0.0) -> np.ndarray:
    r1, r2 = np.asarray(r1, np.float64), np.asarray(r2, np.float64)
    usable = lambda r: (r > 0) & np.isfinite(r)  # noqa: E731
    ok = usable(r1) & usable(r2)
    e = r1
    if act is not None and act_weight > 0:
        act = np.asarray(act, np.float64)
        both = ok & usable(act)
        rho = np.median(r1[both]) / np.median(act[both]) if both.any() else 1.0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            e = np.where(usable(act), r1 ** (1 - act_weight) * (rho * act) ** act_weight, r1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(ok, np.sqrt(e / r2), 1.0)
    return np.clip(s, 1.0 / max_scale, max_scale).astype(np.float32)


def scale_channels(w4: np.ndarray, s, divide: bool = False) -> np.ndarray:
    s = np.asarray(s, np.float32).reshape(w4.shape[0], 1, w4.shape[2], 1)
    factor = (np.float32(1.0) / s) if divide else s
    with np.errstate(over="ignore"):  # float32 products beyond its range are inf, as in the kernel
        return (w4 * factor).astype(np.float32)


def histogram_rebin(src: np.ndarray, src_lo: float, src_hi: float,
                    dst_lo: float, dst_hi: float, dst_bins: int) -> np.ndarray:
    """Exact redistribution through the cumulative distribution function."""
    src_edges = np.linspace(src_lo, src_hi, src.shape[0] + 1)
    cdf = np.concatenate([[0.0], np.cumsum(src)])
    dst_edges = np.linspace(dst_lo, dst_hi, dst_bins + 1)
    return np.diff(np.interp(dst_edges, src_edges, cdf))


def quantize_dequantize(x: np.ndarray, scale: float, zero_point: float, qmin: int, qmax: int) -> np.ndarray:
    q = np.clip(np.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def histogram_quant_errors(hist, lo, hi, scales, zero_points, qmin, qmax,
                           samples_per_bin: int = 2000) -> np.ndarray:
    """Numerical integration: each bin's density sampled at evenly spaced midpoints."""
    hist = np.asarray(hist, dtype=np.float64)
    nbins = hist.shape[0]
    width = (hi - lo) / nbins
    offsets = (np.arange(samples_per_bin) + 0.5) / samples_per_bin
    points = lo + (np.arange(nbins)[:, None] + offsets[None, :]) * width
    out = []
    for scale, zp in zip(np.atleast_1d(scales), np.broadcast_to(zero_points, np.shape(np.atleast_1d(scales)))):
        err = (points - quantize_dequantize(points, scale, zp, qmin, qmax)) ** 2
        out.append(float((err.mean(axis=1) * hist).sum()))
    return np.array(out)


def tensor_quant_errors(x, scales, zero_points, qmin, qmax) -> np.ndarray:
    x = np.asarray(x)
    x = (x if x.dtype == np.float64 else x.astype(np.float32)).astype(np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    if scales.ndim == 1:
        scales = np.broadcast_to(scales, (x.shape[0], scales.shape[0]))
    zps = np.broadcast_to(np.asarray(zero_points, dtype=np.float64), scales.shape)
    out = np.empty(scales.shape)
    for r in range(x.shape[0]):
        row = x[r][np.isfinite(x[r])]
        for k in range(scales.shape[1]):
            out[r, k] = ((row - quantize_dequantize(row, scales[r, k], zps[r, k], qmin, qmax)) ** 2).sum()
    return out


def histogram_quantiles(hist, lo, hi, qs) -> np.ndarray:
    hist = np.asarray(hist, dtype=np.float64)
    if hist.sum() <= 0:
        return np.full(np.shape(np.atleast_1d(qs)), float(lo))
    edges = np.linspace(lo, hi, hist.shape[0] + 1)
    cdf = np.concatenate([[0.0], np.cumsum(hist)])
    # Where the cdf is flat (empty bins) take the first edge that reaches the target.
    targets = np.atleast_1d(qs) * cdf[-1]
    out = []
    for t in targets:
        i = max(int(np.searchsorted(cdf, t, side="left")) - 1, 0)
        i = min(i, hist.shape[0] - 1)
        frac = (t - cdf[i]) / hist[i] if hist[i] > 0 else 0.0
        out.append(edges[i] + np.clip(frac, 0, 1) * (edges[1] - edges[0]))
    return np.array(out)


def histogram_entropy_threshold(abs_hist, hi, num_quant_bins: int = ENTROPY_QUANT_BINS) -> float:
    p_all = np.asarray(abs_hist, dtype=np.float64)
    nbins = p_all.shape[0]
    best_kl, best_i = np.inf, num_quant_bins
    for i in range(num_quant_bins, nbins + 1):
        p = p_all[:i].copy()
        p[-1] += p_all[i:].sum()
        q = np.zeros(i)
        for level in range(num_quant_bins):
            start, stop = level * i // num_quant_bins, (level + 1) * i // num_quant_bins
            nonzero = p[start:stop] != 0
            if nonzero.any():
                q[start:stop][nonzero] = p_all[start:stop].sum() / nonzero.sum()
        if p.sum() <= 0 or q.sum() <= 0:
            continue
        pn, qn = p / p.sum(), q / q.sum()
        mask = pn > 0
        with np.errstate(divide="ignore"):
            kl = float((pn[mask] * np.log(pn[mask] / qn[mask])).sum())
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i * hi / nbins


# ---- learned rounding (csrc/kernels/rounding.h) -----------------------------------------

ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


def fit_rounding(weight, scale, gram, target, qmin, qmax, *, algorithm=0, iterations=1000,
                 learning_rate=0.1, reg_param=0.01, beta_range=(20.0, 2.0), warm_start=0.2,
                 keep_best=True):
    """(q int8, param float) of the same loss and Adam updates as the kernel, in float64,
    vectorised over all rows. weight/target [groups, rows, k], scale [groups, rows],
    gram [groups, k, k]."""
    w = np.asarray(weight, np.float64)
    s = np.broadcast_to(np.asarray(scale, np.float64), w.shape[:2])[..., None]
    a = np.asarray(gram, np.float64)
    t = np.asarray(target, np.float64)
    zeta, gamma = ADAROUND_ZETA, ADAROUND_GAMMA
    adaround = int(algorithm) == 0
    if adaround:
        base = np.floor(w / s)
        frac = w / s - base
        param = -np.log((zeta - gamma) / (frac - gamma) - 1.0)
    else:
        param = w.copy()
    m = np.zeros_like(param)
    v = np.zeros_like(param)
    warm = int(np.ceil(iterations * warm_start))
    beta_start, beta_end = beta_range
    for it in range(iterations):
        if adaround:
            sig = 1.0 / (1.0 + np.exp(-param))
            h_raw = sig * (zeta - gamma) + gamma
            h = np.clip(h_raw, 0.0, 1.0)
            q = base + h
            dq = np.where((h_raw > 0) & (h_raw < 1), sig * (1 - sig) * (zeta - gamma), 0.0)
        else:
            q = np.round(param / s)
            dq = np.broadcast_to(1.0 / s, q.shape)
        dq = np.where((q >= qmin) & (q <= qmax), dq, 0.0)
        wt = s * np.clip(q, qmin, qmax)
        g = np.einsum("grk,gkj->grj", wt, a)
        d = 2.0 * (g - t) * s * dq
        if adaround and it >= warm:
            rel = (it - warm) / (iterations - warm)
            beta = beta_end + 0.5 * (beta_start - beta_end) * (1.0 + np.cos(rel * np.pi))
            u = 2.0 * h - 1.0
            d = d - np.where(dq != 0, reg_param * beta * np.abs(u) ** (beta - 1) * np.where(u > 0, 2.0, -2.0) * dq, 0.0)
        m = 0.9 * m + 0.1 * d
        v = 0.999 * v + 0.001 * d * d
        m_hat = m / (1 - 0.9 ** (it + 1))
        v_hat = v / (1 - 0.999 ** (it + 1))
        param = param - learning_rate * m_hat / (np.sqrt(v_hat) + 1e-8)
    q = base + (param >= 0) if adaround else np.round(param / s)
    q = np.clip(q, qmin, qmax)
    if keep_best:
        nearest = np.clip(np.round(w / s), qmin, qmax)

        def error(qq):
            wt = s * qq
            return np.einsum("grk,grk->gr", wt, np.einsum("grk,gkj->grj", wt, a) - 2 * t)

        q = np.where((error(q) < error(nearest))[..., None], q, nearest)
    return q.astype(np.int8), param


def rounding_error(q, scale, gram, target):
    """Per row: w~ A w~^T - 2 w~ . t with w~ = scale * q (the loss without its constant)."""
    wt = np.asarray(scale, np.float64)[..., None] * np.asarray(q, np.float64)
    g = np.einsum("grk,gkj->grj", wt, np.asarray(gram, np.float64))
    return np.einsum("grk,grk->gr", wt, g - 2 * np.asarray(target, np.float64))


# ---- Gram matrices of layer inputs (csrc/kernels/window_gram.h, rounding.h) -------------

def gram_product(x, gram) -> np.ndarray:
    """x @ gram in float64."""
    return np.asarray(x, np.float64) @ np.asarray(gram, np.float64)


def gram_product_update(x_prev, x, gram, g) -> np.ndarray:
    """g + (x - x_prev) @ gram in float64 (the kernel adds only the changed entries' rows)."""
    delta = np.asarray(x, np.float64) - np.asarray(x_prev, np.float64)
    return np.asarray(g, np.float64) + delta @ np.asarray(gram, np.float64)


def conv_output_size(size: int, kernel: int, stride: int, dilation: int, pad_before: int, pad_after: int) -> int:
    return (size + pad_before + pad_after - (kernel - 1) * dilation - 1) // stride + 1


def im2col(x, groups, kernel, strides, dilations, pads) -> np.ndarray:
    """The convolution patches of x [N, C, H, W] per group: [groups, N * out_h * out_w, K]
    in float64, K = C / groups * kh * kw ordered (channel, kernel row, kernel column) like a
    Conv weight, positions ordered (image, row, column); zero padding (top, left, bottom,
    right) included, as the Conv sees it."""
    x = np.asarray(x, np.float64)
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    top, left, bottom, right = pads
    out_h = conv_output_size(h, kh, sh, dh, top, bottom)
    out_w = conv_output_size(w, kw, sw, dw, left, right)
    padded = np.zeros((n, c, h + top + bottom, w + left + right))
    padded[:, :, top:top + h, left:left + w] = x
    cols = np.empty((n, c, kh, kw, out_h, out_w))
    for i in range(kh):
        for j in range(kw):
            for oy in range(out_h):  # output row oy, columns ox: input (oy sh + i dh, ox sw + j dw)
                cols[:, :, i, j, oy, :] = padded[:, :, oy * sh + i * dh, j * dw: j * dw + (out_w - 1) * sw + 1: sw]
    cg = c // groups
    cols = cols.reshape(n, groups, cg, kh, kw, out_h, out_w).transpose(1, 0, 5, 6, 2, 3, 4)
    return cols.reshape(groups, n * out_h * out_w, cg * kh * kw)


class WindowGramRef(NamedTuple):
    qq: np.ndarray  # [groups, K, K]
    qf: np.ndarray
    ff: np.ndarray
    sum_q: np.ndarray  # [groups, K]
    sum_f: np.ndarray
    count: int  # patches per group


def window_gram(q, f, groups, kernel, strides, dilations, pads) -> WindowGramRef:
    """Per group, sums over all patches p of q_p q_p^T, q_p f_p^T, f_p f_p^T, q_p and f_p
    (float64; the f terms are None without f)."""
    pq = im2col(q, groups, kernel, strides, dilations, pads)
    pf = None if f is None else im2col(f, groups, kernel, strides, dilations, pads)
    outer = lambda a, b: np.einsum("gpi,gpj->gij", a, b)  # noqa: E731
    return WindowGramRef(outer(pq, pq), None if pf is None else outer(pq, pf), None if pf is None else outer(pf, pf),
                         pq.sum(axis=1), None if pf is None else pf.sum(axis=1), pq.shape[1])
