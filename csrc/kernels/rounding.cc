#include "kernels/rounding.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/multiversion.h"
#include "kernels/parallel.h"

namespace pyquant {
namespace {

// Rectified sigmoid stretch (Louizos et al. 2018), as in the AdaRound paper.
constexpr float kZeta = 1.1f;
constexpr float kGamma = -0.1f;
// Adam, with PyTorch's defaults.
constexpr float kBeta1 = 0.9f;
constexpr float kBeta2 = 0.999f;
constexpr float kEps = 1e-8f;
// Rows fitted together: they share each load of the Gram matrix.
constexpr int kRowBlock = 8;
// The padded width of a row: a multiple of the widest vector tile.
constexpr int64_t kPad = 16;
// Multiply-adds (rows x k^2, times the iterations for fit_rounding) below which one thread
// is faster.
// Measured by benchmarks/kernel_threads.py (2 cores, AVX-512, OMP_WAIT_POLICY=PASSIVE): the
// smallest work from which two threads were 1.1x faster at every larger size; repeated
// sweeps moved it by at most one step of the sweep (x3).
constexpr int64_t kFitRoundingMinParallel = 100'000;
constexpr int64_t kGramProductMinParallel = 10'000'000;


// out[R, cols j0..j0+J) = x[R, kp] @ a[kp, kp] over that column tile; accumulators stay
// in registers for the whole k loop.
template <int R, int J>
PYQUANT_INLINE void product_tile(const float* x, const float* a, int64_t kp, int64_t j0, float* out) {
  float acc[R][J] = {};
  for (int64_t k = 0; k < kp; ++k) {
    const float* ak = a + k * kp + j0;
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * kp + k];
      for (int j = 0; j < J; ++j) acc[r][j] += xr * ak[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) out[r * kp + j0 + j] = acc[r][j];
}

template <int R>
PYQUANT_INLINE void product_rows(const float* x, const float* a, int64_t kp, float* out) {
  int64_t j0 = 0;
  for (; j0 + 32 <= kp; j0 += 32) product_tile<R, 32>(x, a, kp, j0, out);
  for (; j0 < kp; j0 += 16) product_tile<R, 16>(x, a, kp, j0, out);
}

// out[n, kp] = x[n, kp] @ a[kp, kp] for n <= kRowBlock rows (kp a multiple of kPad).
PYQUANT_INLINE void product_block(const float* x, const float* a, int n, int64_t kp, float* out) {
  switch (n) {
    case 8: product_rows<8>(x, a, kp, out); break;
    case 7: product_rows<7>(x, a, kp, out); break;
    case 6: product_rows<6>(x, a, kp, out); break;
    case 5: product_rows<5>(x, a, kp, out); break;
    case 4: product_rows<4>(x, a, kp, out); break;
    case 3: product_rows<3>(x, a, kp, out); break;
    case 2: product_rows<2>(x, a, kp, out); break;
    default: product_rows<1>(x, a, kp, out); break;
  }
}

struct Block {
  const float* weight;  // [n, k], row stride k
  const float* scale;   // [n]
  const float* target;  // [n, k], row stride k
  const float* gram;    // [kp, kp], padded with zeros
  int n;
  int64_t k, kp;
  int8_t* out;  // [n, k]
  float* param_out;  // [n, k] or null: the learned V (AdaRound) or u (AdaQuant)
};

// sum_j wt[j] * (g[j] - 2 t[j]) = w~ A w~^T - 2 w~ . t, without the constant c_r.
double row_error(const float* wt, const float* g, const float* t, int64_t k) {
  double e = 0.0;
  for (int64_t j = 0; j < k; ++j) e += double(wt[j]) * (double(g[j]) - 2.0 * double(t[j]));
  return e;
}

PYQUANT_INLINE void fit_block_body(const Block& b, int qmin, int qmax, const RoundingOptions& o) {
  const int64_t kp = b.kp, size = int64_t(b.n) * kp;
  std::vector<float> param(size, 0.f), m(size, 0.f), v(size, 0.f), base(size, 0.f), wt(size, 0.f),
      g(size, 0.f), t(size, 0.f), dq(size, 0.f), h(size, 0.f);
  const bool adaround = o.algorithm == RoundingAlgorithm::AdaRound;
  for (int r = 0; r < b.n; ++r) {
    for (int64_t j = 0; j < b.k; ++j) {
      const int64_t i = r * kp + j;
      const float w = b.weight[r * b.k + j], s = b.scale[r];
      t[i] = b.target[r * b.k + j];
      if (adaround) {
        const float fl = std::floor(w / s), frac = w / s - fl;
        base[i] = fl;
        // h(V) = frac: the soft weights start equal to the float weights.
        param[i] = -std::log((kZeta - kGamma) / (frac - kGamma) - 1.0f);
      } else {
        param[i] = w;
      }
    }
  }
  const int64_t warm = int64_t(std::ceil(double(o.iterations) * o.warm_start));
  double beta1_t = 1.0, beta2_t = 1.0;
  for (int64_t it = 0; it < o.iterations; ++it) {
    // Soft (AdaRound) or fake-quantized (AdaQuant) weights w~ = s q, and dq = dq/dparam
    // (zero where q is clamped to [qmin, qmax] or h to [0, 1]: no gradient through a clamp).
    for (int r = 0; r < b.n; ++r) {
      const float s = b.scale[r];
      for (int64_t j = 0; j < b.k; ++j) {
        const int64_t i = r * kp + j;
        float q, d;
        if (adaround) {
          const float sig = 1.0f / (1.0f + std::exp(-param[i]));
          const float h_raw = sig * (kZeta - kGamma) + kGamma;
          h[i] = std::min(1.0f, std::max(0.0f, h_raw));
          q = base[i] + h[i];
          d = (h_raw > 0.0f && h_raw < 1.0f) ? sig * (1.0f - sig) * (kZeta - kGamma) : 0.0f;
        } else {
          q = std::nearbyint(param[i] / s);
          d = 1.0f / s;  // straight-through: d round(u/s) / du taken as 1/s
        }
        if (q < float(qmin) || q > float(qmax)) d = 0.0f;
        dq[i] = d;
        wt[i] = s * std::min(float(qmax), std::max(float(qmin), q));
      }
    }
    product_block(wt.data(), b.gram, b.n, kp, g.data());
    const bool reg_on = adaround && it >= warm;
    float beta = o.beta_end;
    if (reg_on) {
      const double rel = double(it - warm) / double(o.iterations - warm);
      beta = float(o.beta_end + 0.5 * (o.beta_start - o.beta_end) * (1.0 + std::cos(rel * M_PI)));
    }
    beta1_t *= kBeta1;
    beta2_t *= kBeta2;
    const float lr_t = float(o.learning_rate * std::sqrt(1.0 - beta2_t) / (1.0 - beta1_t));
    const float eps_t = float(kEps * std::sqrt(1.0 - beta2_t));
    for (int r = 0; r < b.n; ++r) {
      const float s = b.scale[r];
      for (int64_t j = 0; j < b.k; ++j) {
        const int64_t i = r * kp + j;
        // d loss / d param = 2 (w~ A - t) s dq [+ reg_param d(1 - |2h - 1|^beta)/dh dq]
        float d = 2.0f * (g[i] - t[i]) * s * dq[i];
        if (reg_on && dq[i] != 0.0f) {
          const float u = 2.0f * h[i] - 1.0f;
          d -= o.reg_param * beta * std::pow(std::fabs(u), beta - 1.0f) * (u > 0.0f ? 2.0f : -2.0f) * dq[i];
        }
        m[i] = kBeta1 * m[i] + (1.0f - kBeta1) * d;
        v[i] = kBeta2 * v[i] + (1.0f - kBeta2) * d * d;
        param[i] -= lr_t * m[i] / (std::sqrt(v[i]) + eps_t);
      }
    }
  }
  if (b.param_out)
    for (int r = 0; r < b.n; ++r)
      std::copy(param.begin() + r * kp, param.begin() + r * kp + b.k, b.param_out + r * b.k);
  // Hard rounding, and the nearest-rounding start for the keep_best guard.
  std::vector<float> nearest(size, 0.f), g_nearest(size, 0.f);
  for (int r = 0; r < b.n; ++r) {
    const float s = b.scale[r];
    for (int64_t j = 0; j < b.k; ++j) {
      const int64_t i = r * kp + j;
      const float w = b.weight[r * b.k + j];
      float q = adaround ? base[i] + (param[i] >= 0.0f ? 1.0f : 0.0f) : std::nearbyint(param[i] / s);
      wt[i] = s * std::min(float(qmax), std::max(float(qmin), q));
      nearest[i] = s * std::min(float(qmax), std::max(float(qmin), std::nearbyint(w / s)));
    }
  }
  product_block(wt.data(), b.gram, b.n, kp, g.data());
  product_block(nearest.data(), b.gram, b.n, kp, g_nearest.data());
  for (int r = 0; r < b.n; ++r) {
    const float* chosen = wt.data() + r * kp;
    if (o.keep_best) {
      const double learned = row_error(wt.data() + r * kp, g.data() + r * kp, t.data() + r * kp, b.k);
      const double start = row_error(nearest.data() + r * kp, g_nearest.data() + r * kp, t.data() + r * kp, b.k);
      if (!(learned < start)) chosen = nearest.data() + r * kp;
    }
    for (int64_t j = 0; j < b.k; ++j) b.out[r * b.k + j] = int8_t(std::nearbyint(chosen[j] / b.scale[r]));
  }
}

PYQUANT_CLONES(void, fit_block, (const Block& b, int qmin, int qmax, const RoundingOptions& o), (b, qmin, qmax, o))

PYQUANT_INLINE void gram_rows_body(const float* x, const float* a, int n, int64_t kp, float* out) {
  product_block(x, a, n, kp, out);
}

PYQUANT_CLONES(void, gram_rows, (const float* x, const float* a, int n, int64_t kp, float* out), (x, a, n, kp, out))

void gram_product_impl(const float* x, const float* a, int64_t rows, int64_t kp, float* out) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(rows * kp * kp, kGramProductMinParallel))
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int n = int(std::min<int64_t>(kRowBlock, rows - r0));
    gram_rows(x + r0 * kp, a, n, kp, out + r0 * kp);
  }
}

int64_t padded(int64_t k) { return (k + kPad - 1) / kPad * kPad; }

std::vector<float> pad_square(const float* a, int64_t k, int64_t kp) {
  std::vector<float> p(kp * kp, 0.f);
  for (int64_t i = 0; i < k; ++i) std::copy(a + i * k, a + (i + 1) * k, p.begin() + i * kp);
  return p;
}

}  // namespace

void fit_rounding(const float* weight, const float* scale, const float* gram, const float* target,
                  int64_t groups, int64_t rows, int64_t k, int qmin, int qmax,
                  const RoundingOptions& options, int8_t* out, float* param_out) {
  if (groups <= 0 || rows <= 0 || k <= 0) return;
  const int64_t kp = padded(k);
  std::vector<std::vector<float>> grams(groups);
  for (int64_t gi = 0; gi < groups; ++gi) grams[gi] = pad_square(gram + gi * k * k, k, kp);
  const int64_t blocks_per_group = (rows + kRowBlock - 1) / kRowBlock;
  const int64_t blocks = groups * blocks_per_group;
  const int64_t work = groups * rows * kp * kp * std::max<int64_t>(options.iterations, 1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(work, kFitRoundingMinParallel))
  for (int64_t bi = 0; bi < blocks; ++bi) {
    const int64_t gi = bi / blocks_per_group, r0 = (bi % blocks_per_group) * kRowBlock;
    const int64_t row = gi * rows + r0;
    Block b{weight + row * k, scale + row, target + row * k, grams[gi].data(),
            int(std::min<int64_t>(kRowBlock, rows - r0)), k, kp, out + row * k,
            param_out ? param_out + row * k : nullptr};
    fit_block(b, qmin, qmax, options);
  }
}

void gram_product(const float* x, const float* gram, int64_t rows, int64_t k, float* out) {
  if (rows <= 0 || k <= 0) return;
  const int64_t kp = padded(k);
  const std::vector<float> a = pad_square(gram, k, kp);
  std::vector<float> xp(rows * kp, 0.f), op(rows * kp, 0.f);
  for (int64_t r = 0; r < rows; ++r) std::copy(x + r * k, x + (r + 1) * k, xp.begin() + r * kp);
  gram_product_impl(xp.data(), a.data(), rows, kp, op.data());
  for (int64_t r = 0; r < rows; ++r) std::copy(op.begin() + r * kp, op.begin() + r * kp + k, out + r * k);
}

}  // namespace pyquant
