#include "kernels/channel_stats.h"

#include <algorithm>

#include "kernels/multiversion.h"
#include "kernels/parallel.h"

namespace pyquant {
namespace {

// Values below which one thread is faster.
// Measured by benchmarks/kernel_threads.py (2 cores, AVX-512, OMP_WAIT_POLICY=PASSIVE): the
// smallest work from which two threads were 1.1x faster at every larger size; repeated
// sweeps moved it by at most one step of the sweep (x3).
constexpr int64_t kChannelSumsMinParallel = 3'000'000;

constexpr int64_t kBlock = 256;
constexpr int kLanes = 16;

// The sum of one channel: its `outer` rows of `inner` contiguous values, row_stride apart.
// Each block of kBlock values is summed in kLanes partial sums of double (a fixed order,
// which every ISA level vectorises the same way; float32 values near their type's limit
// do not overflow), then the blocks in order.
template <typename T>
PYQUANT_INLINE double channel_total_body(const T* x, int64_t outer, int64_t row_stride, int64_t inner) {
  double total = 0.0;
  for (int64_t o = 0; o < outer; ++o) {
    const T* row = x + o * row_stride;
    for (int64_t start = 0; start < inner; start += kBlock) {
      const int64_t len = std::min(kBlock, inner - start);
      const T* p = row + start;
      double acc[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes)
        for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<double>(p[i + l]);
      double block = 0.0;
      for (; i < len; ++i) block += static_cast<double>(p[i]);
      for (int l = 0; l < kLanes; ++l) block += acc[l];
      total += block;
    }
  }
  return total;
}

PYQUANT_CLONES(double, channel_total, (const float* x, int64_t outer, int64_t row_stride, int64_t inner),
               (x, outer, row_stride, inner))
PYQUANT_CLONES(double, channel_total, (const double* x, int64_t outer, int64_t row_stride, int64_t inner),
               (x, outer, row_stride, inner))

template <typename T>
void channel_sums_impl(const T* x, int64_t outer, int64_t channels, int64_t inner, double* sums) {
  // Parallel over channels: no two threads write the same sum, and each sum's order is fixed.
#pragma omp parallel for schedule(static) num_threads(threads_for(outer * channels * inner, kChannelSumsMinParallel))
  for (int64_t c = 0; c < channels; ++c) sums[c] += channel_total(x + c * inner, outer, channels * inner, inner);
}

}  // namespace

void channel_sums(const float* x, int64_t outer, int64_t channels, int64_t inner, double* sums) {
  channel_sums_impl(x, outer, channels, inner, sums);
}

void channel_sums(const double* x, int64_t outer, int64_t channels, int64_t inner, double* sums) {
  channel_sums_impl(x, outer, channels, inner, sums);
}

}  // namespace pyquant
