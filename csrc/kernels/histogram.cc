#include "kernels/histogram.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pyquant {
namespace {

// Below this many elements the cost of waking threads exceeds the work.
constexpr int64_t kParallelThreshold = 1 << 16;

struct PartialRange {
  float min = std::numeric_limits<float>::infinity();
  float max = -std::numeric_limits<float>::infinity();
  int64_t nonfinite = 0;
};

// Branch-free so that the compiler vectorises it: (v - v) == 0 is false exactly
// for NaN and +/-Inf.
PartialRange scan_range(const float* x, int64_t n) {
  PartialRange r;
  float mn = r.min, mx = r.max;
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const bool finite = (v - v) == 0.0f;
    mn = finite ? std::min(mn, v) : mn;
    mx = finite ? std::max(mx, v) : mx;
    bad += finite ? 0 : 1;
  }
  r.min = mn;
  r.max = mx;
  r.nonfinite = bad;
  return r;
}

}  // namespace

RangeStats range_stats(const float* x, int64_t n) {
  PartialRange total;
  if (n >= kParallelThreshold) {
#pragma omp parallel
    {
      PartialRange local;
#ifdef _OPENMP
      const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
#else
      const int64_t nt = 1, t = 0;
#endif
      const int64_t begin = n * t / nt, end = n * (t + 1) / nt;
      local = scan_range(x + begin, end - begin);
#pragma omp critical
      {
        total.min = std::min(total.min, local.min);
        total.max = std::max(total.max, local.max);
        total.nonfinite += local.nonfinite;
      }
    }
  } else {
    total = scan_range(x, n);
  }

  RangeStats s;
  s.min = total.min;
  s.max = total.max;
  s.finite = n - total.nonfinite;
  if (total.nonfinite > 0) {  // rare: a second pass tells NaN from +/-Inf
    for (int64_t i = 0; i < n; ++i) {
      const float v = x[i];
      if (std::isnan(v)) ++s.nan;
      else if (std::isinf(v)) (v > 0 ? s.pos_inf : s.neg_inf) += 1;
    }
  }
  return s;
}

namespace {

// Four interleaved count arrays: activations after ReLU/ReLU6 pile up in one or
// two bins (0 and 6), and incrementing the same counter back to back stalls on
// store-to-load forwarding; spreading consecutive elements over four copies of
// the histogram breaks that dependency chain.
constexpr int kLanes = 4;

inline int64_t bin_of(float v, float lo, float inv_width, int64_t last) {
  // Same float32 operations as pyquant.reference.histogram_accumulate.
  const float pos = (v - lo) * inv_width;
  if (!(pos >= 0.0f)) return 0;  // also catches pos = NaN, excluded by the caller
  const float capped = pos < static_cast<float>(last) ? pos : static_cast<float>(last);
  return static_cast<int64_t>(capped);
}

void accumulate_serial(const float* x, int64_t n, float lo, float inv_width,
                       int64_t* counts, int64_t nbins) {
  const int64_t last = nbins - 1;
  int64_t* lane[kLanes];
  for (int l = 0; l < kLanes; ++l) lane[l] = counts + l * nbins;
  int64_t i = 0;
  bool finite_block = true;
  for (; i + kLanes <= n; i += kLanes) {
    finite_block = true;
    for (int l = 0; l < kLanes; ++l) finite_block &= (x[i + l] - x[i + l]) == 0.0f;
    if (finite_block) {
      for (int l = 0; l < kLanes; ++l) ++lane[l][bin_of(x[i + l], lo, inv_width, last)];
    } else {
      for (int l = 0; l < kLanes; ++l)
        if ((x[i + l] - x[i + l]) == 0.0f) ++lane[l][bin_of(x[i + l], lo, inv_width, last)];
    }
  }
  for (; i < n; ++i)
    if ((x[i] - x[i]) == 0.0f) ++lane[0][bin_of(x[i], lo, inv_width, last)];
}

}  // namespace

void histogram_accumulate(const float* x, int64_t n, double lo, double hi,
                          double* hist, int64_t nbins) {
  const float lo_f = static_cast<float>(lo);
  const float inv_width = static_cast<float>(static_cast<double>(nbins) / (hi - lo));
  // Integer counts per thread, then one reduction: doubles are only used for
  // the caller-owned histogram (so that re-binning can split bins).
  int nthreads = 1;
#ifdef _OPENMP
  if (n >= kParallelThreshold) nthreads = omp_get_max_threads();
#endif
  const int64_t stride = kLanes * nbins;
  std::vector<int64_t> counts(static_cast<size_t>(nthreads) * stride, 0);
  if (nthreads == 1) {
    accumulate_serial(x, n, lo_f, inv_width, counts.data(), nbins);
  } else {
#pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
      const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
      const int64_t t = 0, nt = 1;
#endif
      const int64_t begin = n * t / nt, end = n * (t + 1) / nt;
      accumulate_serial(x + begin, end - begin, lo_f, inv_width,
                        counts.data() + t * stride, nbins);
    }
  }
  for (int64_t k = 0; k < nthreads * kLanes; ++k)
    for (int64_t b = 0; b < nbins; ++b) hist[b] += static_cast<double>(counts[k * nbins + b]);
}

void histogram_rebin(const double* src, int64_t nsrc, double src_lo, double src_hi,
                     double* dst, int64_t ndst, double dst_lo, double dst_hi) {
  std::fill(dst, dst + ndst, 0.0);
  const double src_w = (src_hi - src_lo) / static_cast<double>(nsrc);
  const double dst_w = (dst_hi - dst_lo) / static_cast<double>(ndst);
  // Positions are measured in destination-bin units; a relative tolerance keeps
  // aligned grids (the common case when a collector grows) from leaking a
  // rounding-error sliver of a bin into its neighbour.
  constexpr double kEdgeTol = 1e-9;
  for (int64_t i = 0; i < nsrc; ++i) {
    const double c = src[i];
    if (c == 0.0) continue;
    double a = (src_lo + i * src_w - dst_lo) / dst_w;
    double b = (src_lo + (i + 1) * src_w - dst_lo) / dst_w;
    const double ra = std::round(a), rb = std::round(b);
    if (std::abs(a - ra) < kEdgeTol) a = ra;
    if (std::abs(b - rb) < kEdgeTol) b = rb;
    const double span = b - a;
    const double ca = std::max(a, 0.0), cb = std::min(b, static_cast<double>(ndst));
    if (cb <= ca) continue;
    int64_t j = static_cast<int64_t>(std::floor(ca));
    const int64_t j_end = std::min<int64_t>(static_cast<int64_t>(std::ceil(cb)), ndst);
    for (; j < j_end; ++j) {
      const double overlap = std::min(cb, static_cast<double>(j + 1)) - std::max(ca, static_cast<double>(j));
      if (overlap > 0) dst[j] += c * overlap / span;
    }
  }
}

}  // namespace pyquant
