#include "kernels/histogram.h"
#include "kernels/multiversion.h"
#include "kernels/parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pyquant {
namespace {

// Elements below which one thread is faster.
// Measured by benchmarks/kernel_threads.py (2 cores, AVX-512, OMP_WAIT_POLICY=PASSIVE): the
// smallest work from which two threads were 1.1x faster at every larger size; repeated
// sweeps moved it by at most one step of the sweep (x3).
constexpr int64_t kRangeMinParallel = 300'000;
constexpr int64_t kHistogramMinParallel = 300'000;

struct PartialRange {
  double min = std::numeric_limits<double>::infinity();
  double max = -std::numeric_limits<double>::infinity();
  int64_t nonfinite = 0;
};

// Branch-free so that the compiler vectorises it: (v - v) == 0 is false exactly
// for NaN and +/-Inf. Min and max are exact in any order.
template <typename T>
PYQUANT_INLINE PartialRange scan_range_body(const T* x, int64_t n) {
  T mn = std::numeric_limits<T>::infinity(), mx = -std::numeric_limits<T>::infinity();
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    const bool finite = (v - v) == T(0);
    mn = finite ? std::min(mn, v) : mn;
    mx = finite ? std::max(mx, v) : mx;
    bad += finite ? 0 : 1;
  }
  PartialRange r;
  r.min = mn;
  r.max = mx;
  r.nonfinite = bad;
  return r;
}

PYQUANT_CLONES(PartialRange, scan_range, (const float* x, int64_t n), (x, n))
PYQUANT_CLONES(PartialRange, scan_range, (const double* x, int64_t n), (x, n))

// This thread's contiguous share [begin, end) of n elements in a parallel region.
void thread_slice(int64_t n, int64_t* begin, int64_t* end) {
#ifdef _OPENMP
  const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
  const int64_t t = 0, nt = 1;
#endif
  *begin = n * t / nt;
  *end = n * (t + 1) / nt;
}

void merge_into(PartialRange* total, const PartialRange& part) {
  total->min = std::min(total->min, part.min);
  total->max = std::max(total->max, part.max);
  total->nonfinite += part.nonfinite;
}

template <typename T>
void count_non_finite(const T* x, int64_t n, RangeStats* s) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    if (std::isnan(v)) ++s->nan;
    else if (std::isinf(v)) (v > 0 ? s->pos_inf : s->neg_inf) += 1;
  }
}

// The RangeStats of x from its combined scan.
template <typename T>
RangeStats stats_of(const T* x, int64_t n, const PartialRange& total) {
  RangeStats s;
  s.min = total.min;
  s.max = total.max;
  s.finite = n - total.nonfinite;
  if (total.nonfinite > 0) count_non_finite(x, n, &s);  // rare: tell NaN from +/-Inf
  return s;
}

template <typename T>
RangeStats range_stats_impl(const T* x, int64_t n) {
  PartialRange total;
#ifdef _OPENMP
  const int nthreads = threads_for(n, kRangeMinParallel);
  if (nthreads > 1) {
    std::vector<PartialRange> parts(static_cast<size_t>(nthreads));
#pragma omp parallel num_threads(nthreads)
    {
      int64_t begin, end;
      thread_slice(n, &begin, &end);
      parts[omp_get_thread_num()] = scan_range(x + begin, end - begin);
    }
    for (const PartialRange& p : parts) merge_into(&total, p);
    return stats_of(x, n, total);
  }
#endif
  total = scan_range(x, n);
  return stats_of(x, n, total);
}

// Binning runs in blocks: a first loop computes bin indices, the range and the
// non-finite count for kBlock values (branch-free, so the compiler vectorises
// it); a second loop increments the counts. Non-finite values get the index
// nbins, a sentinel bin that is dropped. The counts are spread over four
// interleaved copies of the histogram: activations after ReLU/ReLU6 pile up in
// one or two bins, and incrementing the same counter back to back stalls on
// store-to-load forwarding.
constexpr int kLanes = 4;
constexpr int64_t kBlock = 1024;

// counts: kLanes arrays of (nbins + 1) uint32 (small enough to stay in L1 cache for
// 2048 bins); the caller keeps n below 2^32. Bin of v as documented in the header, in the
// arithmetic of T.
// counts[bin] += 1 for the len bins in index, spread over the kLanes copies.
PYQUANT_INLINE void count_bins(const int32_t* index, int64_t len, uint32_t* counts, int64_t lane_size) {
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes)
    for (int l = 0; l < kLanes; ++l) ++counts[l * lane_size + index[j + l]];
  for (; j < len; ++j) ++counts[index[j]];
}

template <typename T>
PYQUANT_INLINE PartialRange accumulate_tracking_body(const T* x, int64_t n, T lo, T inv_width, uint32_t* counts,
                                                     int64_t nbins) {
  const T last = static_cast<T>(nbins - 1);
  const int64_t lane_size = nbins + 1;
  constexpr T kInf = std::numeric_limits<T>::infinity();
  T mn = kInf, mx = -kInf;
  int64_t bad = 0;
  int32_t index[kBlock];
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const T* xb = x + start;
    // Non-finite values enter the reductions as neutral elements (+inf for the
    // min, -inf for the max), so both are plain reductions that vectorise.
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(+ : bad)
    for (int64_t j = 0; j < len; ++j) {
      const T v = xb[j];
      const bool finite = (v - v) == T(0);
      mn = std::min(mn, finite ? v : kInf);
      mx = std::max(mx, finite ? v : -kInf);
      bad += finite ? 0 : 1;
      T pos = (v - lo) * inv_width;
      pos = pos >= T(0) ? pos : T(0);  // NaN compares false: 0, then the sentinel below
      pos = pos < last ? pos : last;
      index[j] = finite ? static_cast<int32_t>(pos) : static_cast<int32_t>(nbins);
    }
    count_bins(index, len, counts, lane_size);
  }
  PartialRange r;
  r.min = mn;
  r.max = mx;
  r.nonfinite = bad;
  return r;
}

#if PYQUANT_X86_LEVELS
// The bin a value of zero gets, computed as the body computes every bin.
PYQUANT_INLINE int32_t zero_bin_of(float lo, float inv_width, int64_t nbins) {
  float pos = (0.0f - lo) * inv_width;
  pos = pos >= 0.0f ? pos : 0.0f;
  pos = pos < float(nbins - 1) ? pos : float(nbins - 1);
  return static_cast<int32_t>(pos);
}

// The AVX-512 and AVX2 copies for float, which most calibration runs use: the same bins and range as
// the body, but values in the bin of zero are counted in the vector loop instead of one by
// one. After ReLU/ReLU6 a third or more of the values are exactly zero (35 % over the 61
// tensors XINT8 calibrates in EfficientNet-Lite0), and the one-by-one increments are the
// loop's bottleneck: the bins of the other values are packed (vpcompressd) and incremented
// as before. On those tensors, one thread: 0.88 -> 0.58 ns per value. Counts are integers,
// so every level gives the same histogram.
PYQUANT_TARGET_AVX512 PartialRange accumulate_tracking_avx512(const float* x, int64_t n, float lo, float inv_width,
                                                               uint32_t* counts, int64_t nbins) {
  const int64_t lane_size = nbins + 1;
  const int32_t zero_bin = zero_bin_of(lo, inv_width, nbins);
  const __m512 vlo = _mm512_set1_ps(lo), vinv = _mm512_set1_ps(inv_width), vlast = _mm512_set1_ps(float(nbins - 1));
  const __m512 vzero = _mm512_setzero_ps();
  const __m512i vsentinel = _mm512_set1_epi32(static_cast<int32_t>(nbins)), vzero_bin = _mm512_set1_epi32(zero_bin);
  __m512 vmin = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t bad = 0, in_zero_bin = 0;
  alignas(64) int32_t index[kBlock + 16];
  int64_t start = 0;
  for (; start + kBlock <= n; start += kBlock) {
    int32_t* packed = index;
    for (int64_t j = 0; j < kBlock; j += 16) {
      const __m512 v = _mm512_loadu_ps(x + start + j);
      const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), vzero, _CMP_EQ_OQ);
      vmin = _mm512_mask_min_ps(vmin, finite, vmin, v);
      vmax = _mm512_mask_max_ps(vmax, finite, vmax, v);
      bad += 16 - __builtin_popcount(finite);
      __m512 pos = _mm512_mul_ps(_mm512_sub_ps(v, vlo), vinv);
      pos = _mm512_min_ps(_mm512_max_ps(pos, vzero), vlast);  // max(NaN, 0) is 0, as in the body
      const __m512i bin = _mm512_mask_mov_epi32(vsentinel, finite, _mm512_cvttps_epi32(pos));
      const __mmask16 other = _mm512_cmpneq_epi32_mask(bin, vzero_bin);
      in_zero_bin += 16 - __builtin_popcount(other);
      _mm512_storeu_si512(packed, _mm512_maskz_compress_epi32(other, bin));
      packed += __builtin_popcount(other);
    }
    count_bins(index, packed - index, counts, lane_size);
  }
  counts[zero_bin] += static_cast<uint32_t>(in_zero_bin);  // n < 2^32 (the caller's flush)
  PartialRange r;
  r.min = _mm512_reduce_min_ps(vmin);
  r.max = _mm512_reduce_max_ps(vmax);
  r.nonfinite = bad;
  if (start < n) merge_into(&r, accumulate_tracking_body(x + start, n - start, lo, inv_width, counts, nbins));
  return r;
}

// The same for AVX2, which has no compress instruction: a table gives, for each mask of the
// 8 lanes to keep, the permutation that packs them to the front (vpermd).
struct PackTable {
  alignas(32) int32_t lanes[256][8];
  PackTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int k = 0;
      for (int l = 0; l < 8; ++l)
        if (mask & (1 << l)) lanes[mask][k++] = l;
      for (; k < 8; ++k) lanes[mask][k] = 0;
    }
  }
};
const PackTable kPackTable;

PYQUANT_TARGET_AVX2 PartialRange accumulate_tracking_avx2(const float* x, int64_t n, float lo, float inv_width,
                                                           uint32_t* counts, int64_t nbins) {
  const int64_t lane_size = nbins + 1;
  const int32_t zero_bin = zero_bin_of(lo, inv_width, nbins);
  const __m256 vlo = _mm256_set1_ps(lo), vinv = _mm256_set1_ps(inv_width), vlast = _mm256_set1_ps(float(nbins - 1));
  const __m256 vzero = _mm256_setzero_ps(), vinf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256 vneg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256i vsentinel = _mm256_set1_epi32(static_cast<int32_t>(nbins)), vzero_bin = _mm256_set1_epi32(zero_bin);
  __m256 vmin = vinf, vmax = vneg_inf;
  int64_t bad = 0, in_zero_bin = 0;
  alignas(32) int32_t index[kBlock + 8];
  int64_t start = 0;
  for (; start + kBlock <= n; start += kBlock) {
    int32_t* packed = index;
    for (int64_t j = 0; j < kBlock; j += 8) {
      const __m256 v = _mm256_loadu_ps(x + start + j);
      const __m256 finite = _mm256_cmp_ps(_mm256_sub_ps(v, v), vzero, _CMP_EQ_OQ);
      vmin = _mm256_min_ps(vmin, _mm256_blendv_ps(vinf, v, finite));
      vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(vneg_inf, v, finite));
      bad += 8 - __builtin_popcount(_mm256_movemask_ps(finite));
      __m256 pos = _mm256_mul_ps(_mm256_sub_ps(v, vlo), vinv);
      pos = _mm256_min_ps(_mm256_max_ps(pos, vzero), vlast);  // max(NaN, 0) is 0, as in the body
      const __m256i bin = _mm256_blendv_epi8(vsentinel, _mm256_cvttps_epi32(pos), _mm256_castps_si256(finite));
      const int other = ~_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(bin, vzero_bin))) & 0xff;
      const int kept = __builtin_popcount(other);
      in_zero_bin += 8 - kept;
      const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPackTable.lanes[other]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed), _mm256_permutevar8x32_epi32(bin, order));
      packed += kept;
    }
    count_bins(index, packed - index, counts, lane_size);
  }
  counts[zero_bin] += static_cast<uint32_t>(in_zero_bin);
  alignas(32) float lanes_min[8], lanes_max[8];
  _mm256_store_ps(lanes_min, vmin);
  _mm256_store_ps(lanes_max, vmax);
  PartialRange r;
  r.min = *std::min_element(lanes_min, lanes_min + 8);
  r.max = *std::max_element(lanes_max, lanes_max + 8);
  r.nonfinite = bad;
  if (start < n) merge_into(&r, accumulate_tracking_body(x + start, n - start, lo, inv_width, counts, nbins));
  return r;
}
#else
PartialRange accumulate_tracking_avx512(const float* x, int64_t n, float lo, float inv_width, uint32_t* counts,
                                        int64_t nbins) {
  return accumulate_tracking_body(x, n, lo, inv_width, counts, nbins);
}
PartialRange accumulate_tracking_avx2(const float* x, int64_t n, float lo, float inv_width, uint32_t* counts,
                                      int64_t nbins) {
  return accumulate_tracking_body(x, n, lo, inv_width, counts, nbins);
}
#endif

PartialRange accumulate_tracking_baseline(const float* x, int64_t n, float lo, float inv_width, uint32_t* counts,
                                          int64_t nbins) {
  return accumulate_tracking_body(x, n, lo, inv_width, counts, nbins);
}
PYQUANT_DISPATCH(PartialRange, accumulate_tracking,
                 (const float* x, int64_t n, float lo, float inv_width, uint32_t* counts, int64_t nbins),
                 (x, n, lo, inv_width, counts, nbins))
PYQUANT_CLONES(PartialRange, accumulate_tracking,
               (const double* x, int64_t n, double lo, double inv_width, uint32_t* counts, int64_t nbins),
               (x, n, lo, inv_width, counts, nbins))

// Runs accumulate_tracking over x on the kernels' threads; returns the combined range and
// the per-thread counts (kLanes * (nbins + 1) per thread).
template <typename T>
PartialRange accumulate_parallel(const T* x, int64_t n, double lo, double hi, int64_t nbins,
                                 std::vector<int64_t>& counts, int& nthreads) {
  // uint32 lane counts are flushed into the int64 totals every kFlush values.
  constexpr int64_t kFlush = int64_t{1} << 31;
  const T lo_t = static_cast<T>(lo);
  const T inv_width = static_cast<T>(static_cast<double>(nbins) / (hi - lo));
  nthreads = threads_for(n, kHistogramMinParallel);
  const int64_t stride = kLanes * (nbins + 1);
  counts.assign(static_cast<size_t>(nthreads) * stride, 0);
  std::vector<PartialRange> parts(static_cast<size_t>(nthreads));
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num();
#else
    const int64_t t = 0;
#endif
    int64_t begin, end;
    thread_slice(n, &begin, &end);
    std::vector<uint32_t> lanes(static_cast<size_t>(stride));
    PartialRange mine;
    for (int64_t chunk = begin; chunk < end; chunk += kFlush) {
      std::fill(lanes.begin(), lanes.end(), 0u);
      merge_into(&mine, accumulate_tracking(x + chunk, std::min(kFlush, end - chunk), lo_t, inv_width,
                                            lanes.data(), nbins));
      for (int64_t k = 0; k < stride; ++k) counts[t * stride + k] += lanes[k];
    }
    parts[t] = mine;
  }
  PartialRange total;
  for (const PartialRange& p : parts) merge_into(&total, p);
  return total;
}

void add_counts(const std::vector<int64_t>& counts, int nthreads, int64_t nbins, double* hist) {
  const int64_t lane_size = nbins + 1;
  for (int64_t k = 0; k < static_cast<int64_t>(nthreads) * kLanes; ++k)
    for (int64_t b = 0; b < nbins; ++b) hist[b] += static_cast<double>(counts[k * lane_size + b]);
}

template <typename T>
bool accumulate_if_in_range_impl(const T* x, int64_t n, double lo, double hi, double* hist, int64_t nbins,
                                 RangeStats* stats) {
  std::vector<int64_t> counts;
  int nthreads = 1;
  const PartialRange total = accumulate_parallel(x, n, lo, hi, nbins, counts, nthreads);
  *stats = stats_of(x, n, total);
  const bool fits = total.nonfinite == 0 && (stats->finite == 0 || (total.min >= lo && total.max <= hi));
  if (fits) add_counts(counts, nthreads, nbins, hist);
  return fits;
}

template <typename T>
void accumulate_impl(const T* x, int64_t n, double lo, double hi, double* hist, int64_t nbins) {
  std::vector<int64_t> counts;
  int nthreads = 1;
  accumulate_parallel(x, n, lo, hi, nbins, counts, nthreads);
  add_counts(counts, nthreads, nbins, hist);
}

}  // namespace

RangeStats range_stats(const float* x, int64_t n) { return range_stats_impl(x, n); }
RangeStats range_stats(const double* x, int64_t n) { return range_stats_impl(x, n); }

bool histogram_accumulate_if_in_range(const float* x, int64_t n, double lo, double hi, double* hist, int64_t nbins,
                                      RangeStats* stats) {
  return accumulate_if_in_range_impl(x, n, lo, hi, hist, nbins, stats);
}
bool histogram_accumulate_if_in_range(const double* x, int64_t n, double lo, double hi, double* hist, int64_t nbins,
                                      RangeStats* stats) {
  return accumulate_if_in_range_impl(x, n, lo, hi, hist, nbins, stats);
}

void histogram_accumulate(const float* x, int64_t n, double lo, double hi, double* hist, int64_t nbins) {
  accumulate_impl(x, n, lo, hi, hist, nbins);
}
void histogram_accumulate(const double* x, int64_t n, double lo, double hi, double* hist, int64_t nbins) {
  accumulate_impl(x, n, lo, hi, hist, nbins);
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
