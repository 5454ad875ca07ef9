// Per-channel statistics of activations, streamed batch by batch.
#pragma once
#include <cstdint>

namespace pyquant {

// Adds to sums[c] the sum of x[o, c, i] over o < outer and i < inner, for a tensor
// viewed as [outer, channels, inner] (row-major): NCHW activations are
// [N, C, H*W], [N, K] matrices are [N, K, 1]. Summation is in double: blocks of 256 values
// in 16 partial sums, then the blocks (a fixed order: the same bits on any number of
// threads and any ISA level).
// Preconditions: x holds outer * channels * inner values; sums holds channels doubles.
void channel_sums(const float* x, int64_t outer, int64_t channels, int64_t inner, double* sums);
void channel_sums(const double* x, int64_t outer, int64_t channels, int64_t inner, double* sums);

}  // namespace pyquant
