// Gram matrices of convolution patches, accumulated straight from NCHW activations
// (no im2col copy in Python). For group gi, the patch at an output position is the
// K = (C/g) * kh * kw input values under the kernel window, ordered (channel, row,
// column) like the Conv weight. For quantized-network inputs q and float-network inputs f
// of the same batch it adds, per group,
//   qq[gi] += sum_p q_p q_p^T,  qf[gi] += sum_p q_p f_p^T,  ff[gi] += sum_p f_p f_p^T,
//   sum_q[gi] += sum_p q_p,     sum_f[gi] += sum_p f_p
// over all output positions p of all images (zero padding included, as the Conv sees it).
#pragma once
#include <cstdint>

namespace pyquant {

struct ConvGeometry {
  int64_t kh, kw, stride_h, stride_w, dil_h, dil_w, pad_top, pad_left, out_h, out_w;
};

// q, f: [n, c, h, w]; qq, qf, ff: [groups, K, K]; sum_q, sum_f: [groups, K] (doubles,
// accumulated into). f may be null: then only qq and sum_q are accumulated, and qf, ff and
// sum_f are neither read nor written (they may be null). Deterministic: the summation order
// does not depend on threads.
void window_gram(const float* q, const float* f, int64_t n, int64_t c, int64_t h, int64_t w, int64_t groups,
                 const ConvGeometry& geo, double* qq, double* qf, double* ff, double* sum_q, double* sum_f);

}  // namespace pyquant
