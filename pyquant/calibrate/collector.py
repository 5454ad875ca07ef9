"""Streaming statistics of one tensor: running range and a histogram that grows.

Only the histogram (num_bins doubles) and a few scalars are kept, never the data, so
memory does not depend on how many batches are absorbed.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .. import kernels

# A constant first batch gives a zero-width range; widen it by this much (relative to
# its magnitude, with an absolute floor) so that the histogram has a valid grid.
_MIN_RELATIVE_WIDTH = 1e-6
_MIN_ABSOLUTE_WIDTH = 1e-12


class NonFiniteValues(ValueError):
    """A tensor held NaN or Inf; ``stats`` says how many of each."""

    def __init__(self, stats: kernels.RangeStats) -> None:
        super().__init__(f"{stats.nan} NaN, {stats.pos_inf} +Inf and {stats.neg_inf} -Inf values")
        self.stats = stats


def initial_grid(value_min: float, value_max: float) -> tuple:
    """(lo, hi) of the histogram grid for values in [value_min, value_max]: the range
    itself, widened when it has (almost) zero width."""
    pad = max(abs(value_min), abs(value_max)) * _MIN_RELATIVE_WIDTH + _MIN_ABSOLUTE_WIDTH
    if value_max - value_min < pad:
        return value_min - pad, value_max + pad
    return value_min, value_max


class TensorCollector:
    """Running min/max (and optionally a histogram) of the finite values of a tensor.

    The histogram has ``num_bins`` equal bins over [lo, hi], set by the first batch.
    When a later batch falls outside, the grid grows by an integer factor k and shifts
    by a whole number of old bins, so every old bin lies inside one new bin and the
    re-binning loses nothing but resolution.
    """

    def __init__(self, num_bins: int = 2048, histogram: bool = True) -> None:
        self.num_bins = int(num_bins)
        self.count = 0
        self.min = math.inf
        self.max = -math.inf
        self.lo = 0.0
        self.hi = 0.0
        self.hist: Optional[np.ndarray] = np.zeros(self.num_bins) if histogram else None

    @property
    def abs_max(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    def update(self, x: np.ndarray) -> kernels.RangeStats:
        """Absorb one batch. Raises NonFiniteValues (and absorbs nothing) on NaN/Inf."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.hist is not None and self.count:
            # Usual case: the batch fits the grid, one pass over the data does everything.
            added, stats = kernels.histogram_accumulate_if_in_range(x, self.hist, self.lo, self.hi)
            if added:  # (with no finite value, stats.min/max are +inf/-inf: no change)
                self.min = min(self.min, float(stats.min))
                self.max = max(self.max, float(stats.max))
                self.count += stats.finite
                return stats
        else:
            stats = kernels.range_stats(x)
        if stats.nan or stats.pos_inf or stats.neg_inf:
            raise NonFiniteValues(stats)
        if stats.finite == 0:
            return stats
        self.min = min(self.min, float(stats.min))
        self.max = max(self.max, float(stats.max))
        if self.hist is not None:
            self._cover(float(stats.min), float(stats.max))
            kernels.histogram_accumulate(x, self.hist, self.lo, self.hi)
        self.count += stats.finite
        return stats

    def _cover(self, batch_min: float, batch_max: float) -> None:
        if self.count == 0:
            self.lo, self.hi = initial_grid(batch_min, batch_max)
            return
        if batch_min >= self.lo and batch_max <= self.hi:
            return
        width = (self.hi - self.lo) / self.num_bins
        low_grew, high_grew = batch_min < self.lo, batch_max > self.hi
        top = max(self.hi, batch_max)
        shift = math.ceil((self.lo - batch_min) / width) if low_grew else 0
        factor = max(1, math.ceil((top - (self.lo - shift * width)) / (self.num_bins * width)))
        # The grid grows by at least 2x; put the spare room on the side(s) that grew, so
        # that a range creeping outwards batch after batch re-bins O(log) times, not
        # once per batch with the grid doubling each time.
        spare = int((self.num_bins * factor * width - (top - (self.lo - shift * width))) / width)
        if low_grew:
            shift += spare // 2 if high_grew else spare
        new_lo = self.lo - shift * width
        new_hi = new_lo + self.num_bins * factor * width
        if new_hi < batch_max:  # floating-point rounding at the top edge
            factor += 1
            new_hi = new_lo + self.num_bins * factor * width
        self.hist = kernels.histogram_rebin(self.hist, self.lo, self.hi, new_lo, new_hi, self.num_bins)
        self.lo, self.hi = new_lo, new_hi

    def merged(self, other: "TensorCollector") -> "TensorCollector":
        """A new collector holding the statistics of both (for shared scales and parallel runs)."""
        result = TensorCollector(self.num_bins, histogram=self.hist is not None and other.hist is not None)
        result.count = self.count + other.count
        result.min, result.max = min(self.min, other.min), max(self.max, other.max)
        if result.hist is None or result.count == 0:
            return result
        parts = [c for c in (self, other) if c.count]
        if len(parts) == 1:
            result.lo, result.hi, result.hist = parts[0].lo, parts[0].hi, parts[0].hist.copy()
            return result
        result.lo, result.hi = min(self.lo, other.lo), max(self.hi, other.hi)
        result.hist = sum(kernels.histogram_rebin(c.hist, c.lo, c.hi, result.lo, result.hi, self.num_bins)
                          for c in parts)
        return result

    def magnitude_histogram(self) -> tuple:
        """(hist of |x| over [0, abs_max-covering hi], hi): the signed histogram folded at zero."""
        hi = max(abs(self.lo), abs(self.hi))
        positive = kernels.histogram_rebin(self.hist, self.lo, self.hi, 0.0, hi, self.num_bins)
        negative = kernels.histogram_rebin(self.hist[::-1], -self.hi, -self.lo, 0.0, hi, self.num_bins)
        return positive + negative, hi


class ChannelMeanCollector:
    """Running per-channel mean of a tensor (sums in float64; C + 1 numbers of state)."""

    def __init__(self, channel_axis: int = 1) -> None:
        self.channel_axis = channel_axis
        self.sums: Optional[np.ndarray] = None
        self.count = 0  # values per channel absorbed so far

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        channels = x.shape[self.channel_axis]
        if self.sums is None:
            self.sums = np.zeros(channels)
        elif self.sums.shape[0] != channels:
            raise ValueError(f"tensor has {channels} channels on axis {self.channel_axis}, earlier batches "
                             f"had {self.sums.shape[0]}")
        kernels.channel_sums(x, self.sums, self.channel_axis)
        self.count += x.size // channels if channels else 0

    @property
    def mean(self) -> np.ndarray:
        if self.sums is None or self.count == 0:
            raise ValueError("no data absorbed")
        return self.sums / self.count
