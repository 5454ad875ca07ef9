#include "kernels/scale_search.h"

#include "kernels/multiversion.h"
#include "kernels/parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace pyquant {
namespace {

// Work (bins x candidates, values x candidates) below which one thread is faster.
// Measured by benchmarks/kernel_threads.py (2 cores, AVX-512, OMP_WAIT_POLICY=PASSIVE): the
// smallest work from which two threads were 1.1x faster at every larger size; repeated
// sweeps moved it by at most one step of the sweep (x3).
constexpr int64_t kHistogramErrorsMinParallel = 30'000;
constexpr int64_t kTensorErrorsMinParallel = 100'000;
constexpr int64_t kEntropyMinParallel = 30'000;

// Integral from 0 to u of (t - round(t))^2 dt, for any real u: whole periods
// contribute 1/12 each, the partial period a cubic.
inline double rounding_error_integral(double u) {
  const double k = std::floor(u + 0.5);
  const double d = u - k;
  return k / 12.0 + (d * d * d + 0.125) / 3.0 - 1.0 / 24.0;
}

// Integral of (x - c)^2 over [a, b].
inline double clip_error_integral(double a, double b, double c) {
  const double da = a - c, db = b - c;
  return (db * db * db - da * da * da) / 3.0;
}

}  // namespace

double histogram_quant_error(const double* hist, int64_t nbins, double lo, double hi,
                             double scale, double zp, double qmin, double qmax) {
  const double width = (hi - lo) / static_cast<double>(nbins);
  const double clip_lo = scale * (qmin - zp), clip_hi = scale * (qmax - zp);
  const double s3 = scale * scale * scale;
  double total = 0.0;
  for (int64_t i = 0; i < nbins; ++i) {
    const double c = hist[i];
    if (c == 0.0) continue;
    const double a = lo + i * width, b = a + width;
    double integral = 0.0;
    if (a < clip_lo) integral += clip_error_integral(a, std::min(b, clip_lo), clip_lo);
    if (b > clip_hi) integral += clip_error_integral(std::max(a, clip_hi), b, clip_hi);
    const double ma = std::max(a, clip_lo), mb = std::min(b, clip_hi);
    if (mb > ma)
      integral += s3 * (rounding_error_integral(mb / scale) - rounding_error_integral(ma / scale));
    total += c * integral / width;
  }
  return total;
}

void histogram_quant_errors(const double* hist, int64_t nbins, double lo, double hi,
                            const double* scales, const double* zps, int64_t ncand,
                            double qmin, double qmax, double* out) {
#pragma omp parallel for schedule(static) num_threads(threads_for(ncand * nbins, kHistogramErrorsMinParallel))
  for (int64_t k = 0; k < ncand; ++k)
    out[k] = histogram_quant_error(hist, nbins, lo, hi, scales[k], zps[k], qmin, qmax);
}

namespace {

// Lanes of each squared-error sum. Fixed, so the additions happen in the same order (and
// give the same bits) at every ISA level; 8 doubles fill one AVX-512 register.
constexpr int kErrorLanes = 8;
// (y + 1.5 * 2^52) - 1.5 * 2^52 rounds a double of magnitude below 2^51 to the nearest
// integer, ties to even (the default rounding mode): nearbyint without a library call, in
// adds the compiler vectorises (it never folds them: no -ffast-math).
constexpr double kRoundToInteger = 6755399441055744.0;

template <typename T>
PYQUANT_INLINE double quant_error(const T* row, int64_t cols, double scale, double zp, double qmin, double qmax) {
  const double inv = 1.0 / scale;
  // Clamping before rounding gives the same clamped integer, and keeps |y| < 2^51.
  const double lo = qmin - zp - 1.0, hi = qmax - zp + 1.0;
  double acc[kErrorLanes] = {};
  const auto add = [&](int lane, double v) {
    double y = v * inv;
    y = y < lo ? lo : (y > hi ? hi : y);  // NaN stays NaN
    double q = ((y + kRoundToInteger) - kRoundToInteger) + zp;
    q = q < qmin ? qmin : (q > qmax ? qmax : q);
    const double d = v - scale * (q - zp);
    acc[lane] += std::fabs(v) <= std::numeric_limits<double>::max() ? d * d : 0.0;  // skip NaN and Inf
  };
  int64_t j = 0;
  for (; j + kErrorLanes <= cols; j += kErrorLanes)
    for (int lane = 0; lane < kErrorLanes; ++lane) add(lane, static_cast<double>(row[j + lane]));
  for (int lane = 0; j < cols; ++j, ++lane) add(lane, static_cast<double>(row[j]));
  double total = 0.0;
  for (int lane = 0; lane < kErrorLanes; ++lane) total += acc[lane];
  return total;
}

PYQUANT_INLINE double quant_error_f32_body(const float* row, int64_t cols, double scale, double zp, double qmin,
                                           double qmax) {
  return quant_error(row, cols, scale, zp, qmin, qmax);
}
PYQUANT_INLINE double quant_error_f64_body(const double* row, int64_t cols, double scale, double zp, double qmin,
                                           double qmax) {
  return quant_error(row, cols, scale, zp, qmin, qmax);
}
PYQUANT_CLONES(double, quant_error_f32,
               (const float* row, int64_t cols, double scale, double zp, double qmin, double qmax),
               (row, cols, scale, zp, qmin, qmax))
PYQUANT_CLONES(double, quant_error_f64,
               (const double* row, int64_t cols, double scale, double zp, double qmin, double qmax),
               (row, cols, scale, zp, qmin, qmax))

inline double quant_error_of(const float* row, int64_t cols, double scale, double zp, double qmin, double qmax) {
  return quant_error_f32(row, cols, scale, zp, qmin, qmax);
}
inline double quant_error_of(const double* row, int64_t cols, double scale, double zp, double qmin, double qmax) {
  return quant_error_f64(row, cols, scale, zp, qmin, qmax);
}

template <typename T>
void tensor_quant_errors_impl(const T* x, int64_t rows, int64_t cols, const double* scales, const double* zps,
                              int64_t ncand, double qmin, double qmax, double* out) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads_for(rows * cols * ncand, kTensorErrorsMinParallel))
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < ncand; ++k)
      out[r * ncand + k] = quant_error_of(x + r * cols, cols, scales[r * ncand + k], zps[r * ncand + k], qmin, qmax);
}

}  // namespace

void tensor_quant_errors(const float* x, int64_t rows, int64_t cols, const double* scales, const double* zps,
                         int64_t ncand, double qmin, double qmax, double* out) {
  tensor_quant_errors_impl(x, rows, cols, scales, zps, ncand, qmin, qmax, out);
}

void tensor_quant_errors(const double* x, int64_t rows, int64_t cols, const double* scales, const double* zps,
                         int64_t ncand, double qmin, double qmax, double* out) {
  tensor_quant_errors_impl(x, rows, cols, scales, zps, ncand, qmin, qmax, out);
}

void histogram_quantiles(const double* hist, int64_t nbins, double lo, double hi,
                         const double* qs, int64_t nq, double* out) {
  const double width = (hi - lo) / static_cast<double>(nbins);
  std::vector<double> cumulative(static_cast<size_t>(nbins) + 1, 0.0);
  for (int64_t i = 0; i < nbins; ++i) cumulative[i + 1] = cumulative[i] + hist[i];
  const double total = cumulative[nbins];
  for (int64_t k = 0; k < nq; ++k) {
    if (total <= 0.0) { out[k] = lo; continue; }
    const double target = std::clamp(qs[k], 0.0, 1.0) * total;
    // First bin whose cumulative count reaches the target.
    const auto it = std::lower_bound(cumulative.begin() + 1, cumulative.end(), target);
    const int64_t i = std::min<int64_t>(it - cumulative.begin() - 1, nbins - 1);
    const double in_bin = hist[i] > 0 ? (target - cumulative[i]) / hist[i] : 0.0;
    out[k] = lo + (static_cast<double>(i) + std::clamp(in_bin, 0.0, 1.0)) * width;
  }
}

namespace {

double kl_divergence_for(const double* abs_hist, int64_t nbins, int64_t i,
                         int64_t num_quant_bins, std::vector<double>& p,
                         std::vector<double>& q) {
  p.assign(abs_hist, abs_hist + i);
  double tail = 0.0;
  for (int64_t j = i; j < nbins; ++j) tail += abs_hist[j];
  p[i - 1] += tail;
  q.assign(static_cast<size_t>(i), 0.0);
  // Merge the slice (without the folded tail, so that clipping is penalised)
  // into num_quant_bins levels, then spread each level's mass evenly over the
  // bins of that level where P is non-zero.
  for (int64_t level = 0; level < num_quant_bins; ++level) {
    const int64_t start = level * i / num_quant_bins;
    const int64_t stop = (level + 1) * i / num_quant_bins;
    double mass = 0.0;
    int64_t nonzero = 0;
    for (int64_t j = start; j < stop; ++j) {
      mass += abs_hist[j];
      nonzero += p[j] != 0.0;
    }
    if (nonzero == 0) continue;
    for (int64_t j = start; j < stop; ++j)
      if (p[j] != 0.0) q[j] = mass / static_cast<double>(nonzero);
  }
  double psum = 0.0, qsum = 0.0;
  for (int64_t j = 0; j < i; ++j) { psum += p[j]; qsum += q[j]; }
  if (psum <= 0.0 || qsum <= 0.0) return std::numeric_limits<double>::infinity();
  double kl = 0.0;
  for (int64_t j = 0; j < i; ++j) {
    if (p[j] <= 0.0) continue;
    const double pj = p[j] / psum;
    const double qj = q[j] / qsum;
    if (qj <= 0.0) return std::numeric_limits<double>::infinity();
    kl += pj * std::log(pj / qj);
  }
  return kl;
}

}  // namespace

double histogram_entropy_threshold(const double* abs_hist, int64_t nbins, double hi,
                                   int64_t num_quant_bins) {
  const int64_t ncand = nbins - num_quant_bins + 1;
  std::vector<double> kl(static_cast<size_t>(ncand));
#pragma omp parallel num_threads(threads_for(ncand * nbins, kEntropyMinParallel))
  {
    std::vector<double> p, q;
#pragma omp for schedule(dynamic, 16)
    for (int64_t c = 0; c < ncand; ++c)
      kl[c] = kl_divergence_for(abs_hist, nbins, num_quant_bins + c, num_quant_bins, p, q);
  }
  const int64_t best = std::min_element(kl.begin(), kl.end()) - kl.begin();
  const double width = hi / static_cast<double>(nbins);
  return static_cast<double>(num_quant_bins + best) * width;
}

}  // namespace pyquant
