#include "kernels/rounding.h"

#include <algorithm>
#include <cmath>
#include <cstring>
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
// Incremental products (g += (w~ - w~_prev) A over the changed entries): a full product
// instead when more than this fraction of a block's entries changed, and at the latest
// after this many incremental updates, so that their float32 rounding errors stay near a
// full product's (64 updates add about sqrt(64) roundings per value; a full product over
// k = 1280 terms about sqrt(1280)). Measured on Lite0's classifier from a real run, 300
// iterations, CPU time of one thread: fraction 0.5 and 64 updates 7.2 s, 0.5 and 16 7.7 s,
// 0.7 and 16 8.3 s (a changed entry costs its multiply-adds and a's row for one row only).
constexpr double kFullProductFraction = 0.5;
constexpr int kFullProductEvery = 64;


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

// Fast element functions of the loop, from adds, multiplies, divisions and bit operations
// only (no libm): a loop of them vectorises, and every x86-64 level computes the same bits
// (each lane does the scalar code's operations in the scalar code's order; no fused
// multiply-add, see multiversion.h). libm's scalar expf/powf per weight per iteration were
// most of the time on small layers (benchmarks/fit_rounding.py).

PYQUANT_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

PYQUANT_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// e^x within 2 ulp: x = n ln2 + r (Cody-Waite, |r| <= ln2/2), e^r by its Taylor series to
// r^7 (truncation below 5e-9 relative), times 2^n built in the exponent bits. 0 below
// -87 and inf above 88 (e^-87 is 1.6e-38, near the smallest normal float).
PYQUANT_INLINE float fast_exp(float x) {
  constexpr float kLog2e = 1.44269504f, kLn2Hi = 0.693145752f, kLn2Lo = 1.42860677e-6f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float xc = std::min(88.0f, std::max(-87.0f, x));
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float e = p * bits_to_float((int32_t(n) + 127) << 23);
  return x < -87.0f ? 0.0f : (x > 88.0f ? INFINITY : e);
}

// ln(x) for normal x > 0 within 2 ulp: x = 2^e m, m in [sqrt(1/2), sqrt(2)), ln m =
// 2 atanh(s) with s = (m - 1) / (m + 1), |s| <= 0.172, by its series to s^11.
// Subnormal x read as if normal (a wrong but finite, very negative logarithm).
PYQUANT_INLINE float fast_log(float x) {
  constexpr float kLn2 = 0.693147181f;
  const int32_t bits = float_to_bits(x);
  float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);
  float e = float((bits >> 23) - 127);
  const bool high = m > 1.41421356f;
  m = high ? m * 0.5f : m;
  e = high ? e + 1.0f : e;
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  float p = 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return e * kLn2 + 2.0f * s * p;
}

// x^y for x in (0, 1] (|2h - 1|): e^(y ln x). The caller gives 0^y (powf's 0, 1 or inf).
PYQUANT_INLINE float fast_pow_unit(float x, float y) { return fast_exp(y * fast_log(x)); }

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

// 16 floats in GCC's vector extension: each level's copy does the same lane operations
// (the baseline copy in four SSE registers). Auto-vectorisation kept update_tile's sums in
// memory, one float at a time.
typedef float Floats16 __attribute__((vector_size(64)));

// g[cols c0..c0+16V) += (sum over the listed j, in list order, of delta[j] * a[j, cols]):
// one row's product updated for the entries of w~ that changed.
template <int V>
PYQUANT_INLINE void update_tile(const float* delta, const int32_t* changed, int64_t count, const float* a,
                                int64_t kp, int64_t c0, float* g) {
  Floats16 acc[V] = {};
  for (int64_t i = 0; i < count; ++i) {
    const int64_t j = changed[i];
    const float d = delta[j];
    const float* aj = a + j * kp + c0;
    for (int v = 0; v < V; ++v) {
      Floats16 x;
      std::memcpy(&x, aj + 16 * v, sizeof x);
      acc[v] += d * x;
    }
  }
  for (int v = 0; v < V; ++v) {
    Floats16 sum;
    std::memcpy(&sum, g + c0 + 16 * v, sizeof sum);
    sum += acc[v];
    std::memcpy(g + c0 + 16 * v, &sum, sizeof sum);
  }
}

// g[r] += delta[r] @ a over row r's changed entries, for the n rows of a block. Column
// tiles outer, rows inner: a tile's columns of a stay in cache across the rows.
PYQUANT_INLINE void update_block(const float* delta, const int32_t* changed, const int64_t* count, int n,
                                 const float* a, int64_t kp, float* g) {
  int64_t c0 = 0;
  for (; c0 + 64 <= kp; c0 += 64)
    for (int r = 0; r < n; ++r)
      if (count[r]) update_tile<4>(delta + r * kp, changed + r * kp, count[r], a, kp, c0, g + r * kp);
  for (; c0 < kp; c0 += 16)
    for (int r = 0; r < n; ++r)
      if (count[r]) update_tile<1>(delta + r * kp, changed + r * kp, count[r], a, kp, c0, g + r * kp);
}

PYQUANT_INLINE void fit_block_body(const Block& b, int qmin, int qmax, const RoundingOptions& o) {
  const int64_t kp = b.kp, k = b.k, size = int64_t(b.n) * kp;
  std::vector<float> param(size, 0.f), m(size, 0.f), v(size, 0.f), base(size, 0.f), wt(size, 0.f),
      wt_prev(size, 0.f), g(size, 0.f), t(size, 0.f), dq(size, 0.f), h(size, 0.f), grad(size, 0.f);
  std::vector<int32_t> changed(size, 0);
  std::vector<int64_t> count(b.n, 0);
  const bool adaround = o.algorithm == RoundingAlgorithm::AdaRound;
  for (int r = 0; r < b.n; ++r) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = r * kp + j;
      const float w = b.weight[r * k + j], s = b.scale[r];
      t[i] = b.target[r * k + j];
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
  const float lo = float(qmin), hi = float(qmax);
  double beta1_t = 1.0, beta2_t = 1.0;
  int updates_since_full = -1;  // < 0: g holds no product yet
  for (int64_t it = 0; it < o.iterations; ++it) {
    // Soft (AdaRound) or fake-quantized (AdaQuant) weights w~ = s q, and dq = dq/dparam
    // (zero where q is clamped to [qmin, qmax] or h to [0, 1]: no gradient through a clamp).
    std::swap(wt, wt_prev);
    for (int r = 0; r < b.n; ++r) {
      const float s = b.scale[r];
      float* pr = param.data() + r * kp;
      float* hr = h.data() + r * kp;
      float* dr = dq.data() + r * kp;
      float* wr = wt.data() + r * kp;
      const float* br = base.data() + r * kp;
      if (adaround) {
        for (int64_t j = 0; j < k; ++j) {
          const float sig = 1.0f / (1.0f + fast_exp(-pr[j]));
          const float h_raw = sig * (kZeta - kGamma) + kGamma;
          hr[j] = std::min(1.0f, std::max(0.0f, h_raw));
          const float q = br[j] + hr[j];
          const float d = (h_raw > 0.0f && h_raw < 1.0f) ? sig * (1.0f - sig) * (kZeta - kGamma) : 0.0f;
          dr[j] = (q < lo || q > hi) ? 0.0f : d;
          wr[j] = s * std::min(hi, std::max(lo, q));
        }
      } else {
        for (int64_t j = 0; j < k; ++j) {
          const float q = std::nearbyint(pr[j] / s);
          dr[j] = (q < lo || q > hi) ? 0.0f : 1.0f / s;  // straight-through: d round(u/s) / du taken as 1/s
          wr[j] = s * std::min(hi, std::max(lo, q));
        }
      }
    }
    // g = w~ A. Saturated entries (h clamped to 0 or 1, q unchanged) keep their w~, so
    // after the first product only the changed entries' rows of A are added in; a full
    // product replaces the running sums when most entries changed, or after
    // kFullProductEvery updates (their rounding errors add up).
    int64_t total = 0;
    if (updates_since_full >= 0) {
      for (int r = 0; r < b.n; ++r) {
        float* dr = wt_prev.data() + r * kp;  // becomes the change w~ - w~_prev
        const float* wr = wt.data() + r * kp;
        int32_t* cr = changed.data() + r * kp;
        int64_t c = 0;
        for (int64_t j = 0; j < k; ++j) dr[j] = wr[j] - dr[j];
        for (int64_t j = 0; j < k; ++j) {  // without a branch: which entries changed is unpredictable
          cr[c] = int32_t(j);
          c += dr[j] != 0.0f;
        }
        count[r] = c;
        total += c;
      }
    }
    if (updates_since_full < 0 || (total > 0 && (updates_since_full >= kFullProductEvery ||
                                                 double(total) > kFullProductFraction * double(b.n * k)))) {
      product_block(wt.data(), b.gram, b.n, kp, g.data());
      updates_since_full = 0;
    } else if (total > 0) {
      update_block(wt_prev.data(), changed.data(), count.data(), b.n, b.gram, kp, g.data());
      ++updates_since_full;
    }
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
    const float reg_scale = o.reg_param * beta, exponent = beta - 1.0f;
    const float pow_at_zero = exponent > 0.0f ? 0.0f : (exponent == 0.0f ? 1.0f : INFINITY);  // powf(0, y)
    for (int r = 0; r < b.n; ++r) {
      const float s = b.scale[r];
      float* gradient = grad.data() + r * kp;
      const float* gr = g.data() + r * kp;
      const float* tr = t.data() + r * kp;
      const float* dr = dq.data() + r * kp;
      const float* hr = h.data() + r * kp;
      // d loss / d param = 2 (w~ A - t) s dq [+ reg_param d(1 - |2h - 1|^beta)/dh dq]
      for (int64_t j = 0; j < k; ++j) gradient[j] = 2.0f * (gr[j] - tr[j]) * s * dr[j];
      if (reg_on) {
        for (int64_t j = 0; j < k; ++j) {
          const float u = 2.0f * hr[j] - 1.0f, au = std::fabs(u);
          // computed unconditionally, then selected: a select of values vectorises (with
          // -ftrapping-math GCC does not evaluate floating-point code a branch skips)
          const float pw = fast_pow_unit(au, exponent);
          const float p = au > 0.0f ? pw : pow_at_zero;
          const float reg = reg_scale * p * (u > 0.0f ? 2.0f : -2.0f) * dr[j];
          gradient[j] = dr[j] != 0.0f ? gradient[j] - reg : gradient[j];
        }
      }
      float* pr = param.data() + r * kp;
      float* mr = m.data() + r * kp;
      float* vr = v.data() + r * kp;
      for (int64_t j = 0; j < k; ++j) {
        const float d = gradient[j];
        mr[j] = kBeta1 * mr[j] + (1.0f - kBeta1) * d;
        vr[j] = kBeta2 * vr[j] + (1.0f - kBeta2) * d * d;
        pr[j] -= lr_t * mr[j] / (std::sqrt(vr[j]) + eps_t);
      }
    }
  }
  if (b.param_out)
    for (int r = 0; r < b.n; ++r)
      std::copy(param.begin() + r * kp, param.begin() + r * kp + k, b.param_out + r * k);
  // Hard rounding, and the nearest-rounding start for the keep_best guard.
  std::vector<float> nearest(size, 0.f), g_nearest(size, 0.f);
  for (int r = 0; r < b.n; ++r) {
    const float s = b.scale[r];
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = r * kp + j;
      const float w = b.weight[r * k + j];
      float q = adaround ? base[i] + (param[i] >= 0.0f ? 1.0f : 0.0f) : std::nearbyint(param[i] / s);
      wt[i] = s * std::min(hi, std::max(lo, q));
      nearest[i] = s * std::min(hi, std::max(lo, std::nearbyint(w / s)));
    }
  }
  product_block(wt.data(), b.gram, b.n, kp, g.data());
  product_block(nearest.data(), b.gram, b.n, kp, g_nearest.data());
  for (int r = 0; r < b.n; ++r) {
    const float* chosen = wt.data() + r * kp;
    if (o.keep_best) {
      const double learned = row_error(wt.data() + r * kp, g.data() + r * kp, t.data() + r * kp, k);
      const double start = row_error(nearest.data() + r * kp, g_nearest.data() + r * kp, t.data() + r * kp, k);
      if (!(learned < start)) chosen = nearest.data() + r * kp;
    }
    for (int64_t j = 0; j < k; ++j) b.out[r * k + j] = int8_t(std::nearbyint(chosen[j] / b.scale[r]));
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

PYQUANT_INLINE void update_rows_body(const float* delta, const int32_t* changed, const int64_t* count, int n,
                                     const float* a, int64_t kp, float* g) {
  update_block(delta, changed, count, n, a, kp, g);
}

PYQUANT_CLONES(void, update_rows, (const float* delta, const int32_t* changed, const int64_t* count, int n,
                                   const float* a, int64_t kp, float* g),
               (delta, changed, count, n, a, kp, g))

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

void gram_product_update(const float* x_prev, const float* x, const float* gram, int64_t rows, int64_t k,
                         float* g) {
  if (rows <= 0 || k <= 0) return;
  const int64_t kp = padded(k);
  const std::vector<float> a = pad_square(gram, k, kp);
  std::vector<float> delta(rows * kp, 0.f), gp(rows * kp, 0.f);
  std::vector<int32_t> changed(rows * kp, 0);
  std::vector<int64_t> count(rows, 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < k; ++j) {
      delta[r * kp + j] = x[r * k + j] - x_prev[r * k + j];
      if (delta[r * kp + j] != 0.0f) changed[r * kp + count[r]++] = int32_t(j);
    }
    std::copy(g + r * k, g + (r + 1) * k, gp.begin() + r * kp);
  }
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int n = int(std::min<int64_t>(kRowBlock, rows - r0));
    update_rows(delta.data() + r0 * kp, changed.data() + r0 * kp, count.data() + r0, n, a.data(), kp,
                gp.data() + r0 * kp);
  }
  for (int64_t r = 0; r < rows; ++r) std::copy(gp.begin() + r * kp, gp.begin() + r * kp + k, g + r * k);
}

}  // namespace pyquant
