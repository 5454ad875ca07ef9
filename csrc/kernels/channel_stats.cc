#include "kernels/channel_stats.h"

#include "kernels/parallel.h"


namespace pyquant {

// Values below which one thread is faster (benchmarks/kernel_threads.py).
constexpr int64_t kChannelSumsMinParallel = 1 << 16;

void channel_sums(const float* x, int64_t outer, int64_t channels, int64_t inner, double* sums) {
  // Parallel over channels: each (o, c) row of `inner` values is contiguous, and no
  // two threads write the same sum. Rows are summed in float blocks of kBlock values
  // (vectorised), and the blocks in double, so long rows lose no precision.
  constexpr int64_t kBlock = 256;
#pragma omp parallel for schedule(static) num_threads(threads_for(outer * channels * inner, kChannelSumsMinParallel))
  for (int64_t c = 0; c < channels; ++c) {
    double total = 0.0;
    for (int64_t o = 0; o < outer; ++o) {
      const float* row = x + (o * channels + c) * inner;
      for (int64_t start = 0; start < inner; start += kBlock) {
        const int64_t end = start + kBlock < inner ? start + kBlock : inner;
        float block = 0.0f;
#pragma omp simd reduction(+ : block)
        for (int64_t i = start; i < end; ++i) block += row[i];
        total += block;
      }
    }
    sums[c] += total;
  }
}

}  // namespace pyquant
