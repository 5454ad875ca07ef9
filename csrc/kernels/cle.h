// Cross-layer equalization kernels (Nagel et al. 2019, "Data-Free Quantization Through
// Weight Equalization and Bias Correction", section 4.1).
//
// Every weight layout is handled through one view: a tensor seen as [A, B, C, D]
// (row-major) whose channel a*C + c is the slice w[a, :, c, :]. Output channels of a
// Conv [O, I/g, kh, kw] are [O, 1, 1, I/g*kh*kw]; input channels of a grouped Conv are
// [g, O/g, I/g, kh*kw]; a Gemm weight [N, K] has output channels [N, 1, 1, K] and input
// channels [1, N, K, 1].
#pragma once
#include <cstdint>

namespace pyquant {

// out[a*C + c] = max |w[a, :, c, :]| (0 for an empty slice; NaN values are ignored, an
// infinity counts). out has A*C floats.
void channel_abs_max(const float* w, int64_t A, int64_t B, int64_t C, int64_t D, float* out);

// Equalizing scales s_i = sqrt(e_i / r2_i), computed in double: dividing the first
// layer's output channel i by s_i and multiplying the second layer's input channel i by
// s_i leaves the second with range sqrt(e_i * r2_i). Without activation ranges (act null
// or act_weight 0) e_i = r1_i: both weights get range sqrt(r1_i * r2_i) (the paper's
// choice). With the ranges act_i of the activation between the layers (which s_i divides
// too) and act_weight b in (0, 1], e_i = r1_i^(1-b) * (rho * act_i)^b: the channels the
// activation barely uses are not blown up relative to the others, which per-tensor
// activation scales cannot afford. rho = median(r1) / median(act) over the channels where
// both are positive puts the activation ranges in the weights' units, so a uniform s
// stays neutral; e_i = r1_i where act_i is zero or not finite (a dead channel).
// s_i = 1 where r1_i or r2_i is zero or not finite (nothing to balance). Scales are
// clamped to [1/max_scale, max_scale].
// r1, r2 and act are doubles (float32 ranges convert exactly); s is float32, the weights' type.
void equalization_scales(const double* r1, const double* r2, const double* act, double act_weight, int64_t n,
                         double max_scale, float* s);

// w[a, :, c, :] *= s[a*C + c] (or /= when divide). In place.
void scale_channels(float* w, int64_t A, int64_t B, int64_t C, int64_t D, const float* s, bool divide);

}  // namespace pyquant
