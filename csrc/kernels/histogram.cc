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

void accumulate_serial(const float* x, int64_t n, double lo, double inv_width,
                       int64_t* counts, int64_t nbins) {
  const int64_t last = nbins - 1;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    if (!((v - v) == 0.0f)) continue;  // NaN / Inf: reported by range_stats
    double pos = (static_cast<double>(v) - lo) * inv_width;
    int64_t b = static_cast<int64_t>(std::floor(pos));
    b = b < 0 ? 0 : (b > last ? last : b);
    ++counts[b];
  }
}

}  // namespace

void histogram_accumulate(const float* x, int64_t n, double lo, double hi,
                          double* hist, int64_t nbins) {
  const double inv_width = static_cast<double>(nbins) / (hi - lo);
  // Integer counts per thread, then one reduction: doubles are only used for
  // the caller-owned histogram (so that re-binning can split bins).
  int nthreads = 1;
#ifdef _OPENMP
  if (n >= kParallelThreshold) nthreads = omp_get_max_threads();
#endif
  std::vector<int64_t> counts(static_cast<size_t>(nthreads) * nbins, 0);
  if (nthreads == 1) {
    accumulate_serial(x, n, lo, inv_width, counts.data(), nbins);
  } else {
#pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
      const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
      const int64_t t = 0, nt = 1;
#endif
      const int64_t begin = n * t / nt, end = n * (t + 1) / nt;
      accumulate_serial(x + begin, end - begin, lo, inv_width,
                        counts.data() + t * nbins, nbins);
    }
  }
  for (int t = 0; t < nthreads; ++t)
    for (int64_t b = 0; b < nbins; ++b) hist[b] += static_cast<double>(counts[t * nbins + b]);
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
