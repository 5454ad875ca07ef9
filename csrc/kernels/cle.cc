#include "kernels/cle.h"

#include <algorithm>
#include <cmath>
#include <vector>

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

namespace {

bool usable(double r) { return r > 0.0 && std::isfinite(r); }

// numpy's median: the mean of the two middle values for an even count. v is reordered.
double median(std::vector<double>& v) {
  const size_t mid = v.size() / 2;
  std::nth_element(v.begin(), v.begin() + mid, v.end());
  const double upper = v[mid];
  if (v.size() % 2) return upper;
  return 0.5 * (upper + *std::max_element(v.begin(), v.begin() + mid));
}

}  // namespace

void equalization_scales(const double* r1, const double* r2, const double* act, double act_weight, int64_t n,
                         double max_scale, float* s) {
  const bool with_act = act != nullptr && act_weight > 0.0;
  double rho = 1.0;
  if (with_act) {
    std::vector<double> first, activation;
    for (int64_t i = 0; i < n; ++i) {
      if (usable(r1[i]) && usable(r2[i]) && usable(act[i])) {
        first.push_back(r1[i]);
        activation.push_back(act[i]);
      }
    }
    if (!first.empty()) rho = median(first) / median(activation);
  }
  for (int64_t i = 0; i < n; ++i) {
    const double a = r1[i], b = r2[i];
    if (!usable(a) || !usable(b)) {
      s[i] = 1.0f;
      continue;
    }
    double e = a;
    if (with_act && usable(act[i])) e = std::pow(a, 1.0 - act_weight) * std::pow(rho * act[i], act_weight);
    const double scale = std::sqrt(e / b);
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
