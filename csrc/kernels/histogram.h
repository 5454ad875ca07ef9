// Streaming range and histogram kernels for calibration.
//
// Plain C++17, no Python headers. Every function is stateless: the running
// histogram and its range are owned by the caller (pyquant.calibrate.collector),
// so nothing here grows with the number of calibration batches. The tensor kernels take
// float32 or float64 data and compute in that precision (a float64 tensor keeps its range).
#pragma once
#include <cstdint>

namespace pyquant {

// Summary of one tensor. min/max cover the finite values only; NaN and +/-Inf
// are counted separately so that the caller can report them instead of letting
// them poison the range. With no finite value, min = +inf and max = -inf. min and
// max are values of the tensor (exact in double for either input type).
struct RangeStats {
  int64_t finite = 0;
  int64_t nan = 0;
  int64_t pos_inf = 0;
  int64_t neg_inf = 0;
  double min = 0.0;
  double max = 0.0;
};

// Preconditions: x points to n values (n >= 0).
RangeStats range_stats(const float* x, int64_t n);
RangeStats range_stats(const double* x, int64_t n);

// Adds the finite values of x to hist, nbins equal bins over [lo, hi].
// Bin of v: floor((v - lo) * inv_width) in the arithmetic of x's type T (float32 or
// float64), with inv_width = T(nbins / (hi - lo)) and lo rounded to T, clamped to
// [0, nbins - 1] (so v == hi lands in the last bin). Non-finite values are skipped.
// Preconditions: 1 <= nbins < 2^31, lo and hi finite, hi > lo, hi - lo finite, hist has
// nbins doubles. Temporary memory: 48 bytes per bin and thread.
void histogram_accumulate(const float* x, int64_t n, double lo, double hi,
                          double* hist, int64_t nbins);
void histogram_accumulate(const double* x, int64_t n, double lo, double hi,
                          double* hist, int64_t nbins);

// One pass that does both: computes the RangeStats of x and bins it as
// histogram_accumulate would, but adds the counts to hist only if every value is
// finite and inside [lo, hi] (the common case once a few batches have set the
// range). Returns true if hist was updated; otherwise hist is unchanged and the
// caller grows the range and calls histogram_accumulate.
// Preconditions: as histogram_accumulate.
bool histogram_accumulate_if_in_range(const float* x, int64_t n, double lo, double hi,
                                      double* hist, int64_t nbins, RangeStats* stats);
bool histogram_accumulate_if_in_range(const double* x, int64_t n, double lo, double hi,
                                      double* hist, int64_t nbins, RangeStats* stats);

// Re-bins a histogram onto a new grid, assuming a uniform density inside each
// source bin: each source bin's count is split over the destination bins in
// proportion to their overlap. Mass outside [dst_lo, dst_hi] is dropped. When
// every source bin lies inside one destination bin (aligned growth) this is
// exact. dst is overwritten.
// Preconditions: nsrc, ndst >= 1; src_hi > src_lo; dst_hi > dst_lo; all finite.
void histogram_rebin(const double* src, int64_t nsrc, double src_lo, double src_hi,
                     double* dst, int64_t ndst, double dst_lo, double dst_hi);

}  // namespace pyquant
