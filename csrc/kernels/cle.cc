#include "kernels/cle.h"

#include <algorithm>
#include <cmath>

namespace pyquant {

void channel_abs_max(const float* w, int64_t A, int64_t B, int64_t C, int64_t D, float* out) {
  for (int64_t a = 0; a < A; ++a) {
    for (int64_t c = 0; c < C; ++c) {
      float m = 0.0f;
      for (int64_t b = 0; b < B; ++b) {
        const float* p = w + ((a * B + b) * C + c) * D;
        for (int64_t d = 0; d < D; ++d) m = std::max(m, std::fabs(p[d]));
      }
      out[a * C + c] = m;
    }
  }
}

void equalization_scales(const float* r1, const float* r2, int64_t n, double max_scale, float* s) {
  for (int64_t i = 0; i < n; ++i) {
    const double a = r1[i], b = r2[i];
    if (!(a > 0.0) || !(b > 0.0) || !std::isfinite(a) || !std::isfinite(b)) {
      s[i] = 1.0f;
      continue;
    }
    const double scale = std::sqrt(a / b);
    s[i] = static_cast<float>(std::clamp(scale, 1.0 / max_scale, max_scale));
  }
}

void scale_channels(float* w, int64_t A, int64_t B, int64_t C, int64_t D, const float* s, bool divide) {
  for (int64_t a = 0; a < A; ++a) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        const float f = divide ? 1.0f / s[a * C + c] : s[a * C + c];
        float* p = w + ((a * B + b) * C + c) * D;
        for (int64_t d = 0; d < D; ++d) p[d] *= f;
      }
    }
  }
}

}  // namespace pyquant
