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
// Rows fitted together: they share each load of the Gram matrix (and rows of several groups
// share a block when a group has fewer, as a depthwise layer's one row per group).
constexpr int kRowBlock = 8;
// The padded width of a row: a multiple of the widest vector tile. The element-wise loops
// run over the padded width too (no remainder loop); padded entries are neutral (zero
// weight and gradient, a saturated V).
constexpr int kPad = 16;
// AdaRound's V of padded entries: saturated at h = 0, so their soft weight stays 0.
constexpr float kPaddingParam = -20.0f;
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


// Fused multiply-add x * y + z, rounded once: one instruction where the level has FMA (the
// loops below vectorise it to vfmadd), libm's correctly rounded fmaf on the baseline, so
// every level gives the same bits (what -ffp-contract=off keeps for separate operations).
PYQUANT_INLINE float fma(float x, float y, float z) { return __builtin_fmaf(x, y, z); }

// out[R, cols j0..j0+J) = x[R, kp] @ a[kp, kp] over that column tile; accumulators stay
// in registers for the whole k loop.
template <int R, int J>
PYQUANT_INLINE void product_tile(const float* x, const float* a, int64_t kp, int64_t j0, float* out) {
  float acc[R][J] = {};
  for (int64_t k = 0; k < kp; ++k) {
    const float* ak = a + k * kp + j0;
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * kp + k];
      for (int j = 0; j < J; ++j) acc[r][j] = fma(xr, ak[j], acc[r][j]);
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

// Fast element functions of the loop, from adds, multiplies, fused multiply-adds, divisions
// and bit operations only (no libm): a loop of them vectorises, and every x86-64 level
// computes the same bits (each lane does the scalar code's operations in the scalar code's
// order; fma is rounded once on every level). libm's scalar expf/powf per weight per
// iteration were most of the time on small layers (benchmarks/fit_rounding.py).

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
  const float n = fma(xc, kLog2e, kRound) - kRound;
  const float r = fma(-n, kLn2Lo, fma(-n, kLn2Hi, xc));
  float p = 1.0f / 5040.0f;
  p = fma(p, r, 1.0f / 720.0f);
  p = fma(p, r, 1.0f / 120.0f);
  p = fma(p, r, 1.0f / 24.0f);
  p = fma(p, r, 1.0f / 6.0f);
  p = fma(p, r, 0.5f);
  p = fma(p, r, 1.0f);
  p = fma(p, r, 1.0f);
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
  p = fma(p, s2, 1.0f / 9.0f);
  p = fma(p, s2, 1.0f / 7.0f);
  p = fma(p, s2, 1.0f / 5.0f);
  p = fma(p, s2, 1.0f / 3.0f);
  p = fma(p, s2, 1.0f);
  return fma(e, kLn2, 2.0f * s * p);
}

// x^y for x in (0, 1] (|2h - 1|): e^(y ln x). The caller gives 0^y (powf's 0, 1 or inf).
PYQUANT_INLINE float fast_pow_unit(float x, float y) { return fast_exp(y * fast_log(x)); }

// What changes between iterations but not between blocks, computed once per call.
struct Schedule {
  int64_t warm;  // iterations without the rounding regulariser
  // Per iteration: Adam's step lr sqrt(1 - beta2^t) / (1 - beta1^t) and its epsilon
  // eps sqrt(1 - beta2^t) (PyTorch's bias correction, folded), and AdaRound's beta.
  std::vector<float> lr, eps, beta;
};

Schedule make_schedule(const RoundingOptions& o) {
  Schedule sc;
  sc.warm = int64_t(std::ceil(double(o.iterations) * o.warm_start));
  double beta1_t = 1.0, beta2_t = 1.0;
  for (int64_t it = 0; it < o.iterations; ++it) {
    beta1_t *= kBeta1;
    beta2_t *= kBeta2;
    sc.lr.push_back(float(o.learning_rate * std::sqrt(1.0 - beta2_t) / (1.0 - beta1_t)));
    sc.eps.push_back(float(kEps * std::sqrt(1.0 - beta2_t)));
    float beta = o.beta_end;
    if (it >= sc.warm) {
      const double rel = double(it - sc.warm) / double(o.iterations - sc.warm);
      beta = float(o.beta_end + 0.5 * (o.beta_start - o.beta_end) * (1.0 + std::cos(rel * M_PI)));
    }
    sc.beta.push_back(beta);
  }
  return sc;
}

struct Block {
  const float* weight;  // [n, k], row stride k
  const float* scale;   // [n]
  const float* target;  // [n, k], row stride k
  const float* gram[kRowBlock];  // row r's [kp, kp], padded with zeros (rows of one group share it)
  int n;
  int64_t k, kp;
  int8_t* out;  // [n, k]
  float* param_out;  // [n, k] or null: the learned V (AdaRound) or u (AdaQuant)
};

// x[n, kp] @ gram for a block's rows: one product per run of rows that share a Gram matrix.
PYQUANT_INLINE void block_product(const Block& b, const float* x, float* out) {
  for (int r0 = 0, r1 = 0; r0 < b.n; r0 = r1) {
    for (r1 = r0 + 1; r1 < b.n && b.gram[r1] == b.gram[r0];) ++r1;
    product_block(x + r0 * b.kp, b.gram[r0], r1 - r0, b.kp, out + r0 * b.kp);
  }
}

// sum_j wt[j] * (g[j] - 2 t[j]) = w~ A w~^T - 2 w~ . t, without the constant c_r.
double row_error(const float* wt, const float* g, const float* t, int64_t k) {
  double e = 0.0;
  for (int64_t j = 0; j < k; ++j) e += double(wt[j]) * (double(g[j]) - 2.0 * double(t[j]));
  return e;
}

// g[cols c0..c0+16V) += (sum over the listed j, in list order, of delta[j] * a[j, cols]):
// one row's product updated for the entries of w~ that changed. In this form (V vectors
// unrolled, flat sums) GCC 12 keeps the V sums in registers at every level; one loop over
// the 16V columns, or sums shaped [1][16], kept them in memory, one float at a time.
template <int V>
PYQUANT_INLINE void update_tile(const float* delta, const int32_t* changed, int64_t count, const float* a,
                                int64_t kp, int64_t c0, float* g) {
  float acc[kPad * V] = {};
  for (int64_t i = 0; i < count; ++i) {
    const int64_t j = changed[i];
    const float d = delta[j];
    const float* aj = a + j * kp + c0;
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      for (int l = 0; l < kPad; ++l) acc[kPad * v + l] = fma(d, aj[kPad * v + l], acc[kPad * v + l]);
  }
  for (int c = 0; c < kPad * V; ++c) g[c0 + c] += acc[c];
}

// g[r] += delta[r] @ a[r] over row r's changed entries, for the n rows of a block. Column
// tiles outer, rows inner: a tile's columns of a stay in cache across the rows.
PYQUANT_INLINE void update_block(const float* delta, const int32_t* changed, const int64_t* count, int n,
                                 const float* const* a, int64_t kp, float* g) {
  int64_t c0 = 0;
  for (; c0 + 64 <= kp; c0 += 64)
    for (int r = 0; r < n; ++r)
      if (count[r]) update_tile<4>(delta + r * kp, changed + r * kp, count[r], a[r], kp, c0, g + r * kp);
  for (; c0 + 32 <= kp; c0 += 32)
    for (int r = 0; r < n; ++r)
      if (count[r]) update_tile<2>(delta + r * kp, changed + r * kp, count[r], a[r], kp, c0, g + r * kp);
  for (; c0 < kp; c0 += kPad)
    for (int r = 0; r < n; ++r)
      if (count[r]) update_tile<1>(delta + r * kp, changed + r * kp, count[r], a[r], kp, c0, g + r * kp);
}

// The state of a block's rows, [n, kp] each (padded entries neutral; scale: the row's scale
// at each entry, so that the element-wise loops run once over the block, not per row: a
// depthwise layer's rows are 25 wide), and per row how many entries changed their soft
// weight in this iteration and which.
struct BlockState {
  std::vector<float> param, m, v, base, wt, delta, g, t, dq, h, scale;
  std::vector<int32_t> changed;
  std::vector<int64_t> count;
  explicit BlockState(int n, int64_t kp)
      : param(n * kp, 0.f), m(n * kp, 0.f), v(n * kp, 0.f), base(n * kp, 0.f), wt(n * kp, 0.f),
        delta(n * kp, 0.f), g(n * kp, 0.f), t(n * kp, 0.f), dq(n * kp, 0.f), h(n * kp, 0.f), scale(n * kp, 0.f),
        changed(n * kp, 0), count(n, 0) {}
};

// The soft (AdaRound) or fake-quantized (AdaQuant) weights w~ = s q of size entries, dq = dq/dparam (zero where q is clamped to [qmin, qmax] or h to [0, 1]: no
// gradient through a clamp), and the change of w~ since the last iteration; returns how
// many entries changed. One loop, so that each entry is read and written once; the arrays
// are restrict parameters, as GCC vectorises such a loop only when it need not check at run
// time that its seven arrays do not overlap.
PYQUANT_INLINE int64_t soft_weights(const float* __restrict p, const float* __restrict base,
                                    const float* __restrict scale, float* __restrict h, float* __restrict dq,
                                    float* __restrict wt, float* __restrict delta, int64_t size, bool adaround,
                                    float lo, float hi) {
  int32_t changes = 0;
  if (adaround) {
    for (int64_t j = 0; j < size; ++j) {
      const float s = scale[j];
      const float sig = 1.0f / (1.0f + fast_exp(-p[j]));
      const float h_raw = fma(sig, kZeta - kGamma, kGamma);
      const float hj = std::min(1.0f, std::max(0.0f, h_raw));
      const float q = base[j] + hj;
      const float d = (h_raw > 0.0f && h_raw < 1.0f) ? sig * (1.0f - sig) * (kZeta - kGamma) : 0.0f;
      const float w = s * std::min(hi, std::max(lo, q));
      const float change = w - wt[j];
      h[j] = hj;
      dq[j] = (q < lo || q > hi) ? 0.0f : d;
      wt[j] = w;
      delta[j] = change;
      changes += change != 0.0f;
    }
  } else {
    for (int64_t j = 0; j < size; ++j) {
      const float s = scale[j];
      const float q = std::nearbyint(p[j] / s);
      const float w = s * std::min(hi, std::max(lo, q));
      const float change = w - wt[j];
      dq[j] = (q < lo || q > hi) ? 0.0f : 1.0f / s;  // straight-through: d round(u/s) / du taken as 1/s
      wt[j] = w;
      delta[j] = change;
      changes += change != 0.0f;
    }
  }
  return changes;
}

// The regulariser's settings for one iteration: reg_param * d(1 - |2h - 1|^beta)/dh.
struct Regulariser {
  bool on;
  float scale, exponent, pow_at_zero;
};

// The gradient and Adam step of size entries (restrict arrays, as above):
// d loss / d param = 2 (w~ A - t) s dq [+ reg_param d(1 - |2h - 1|^beta)/dh dq].
template <bool kRegulariser>
PYQUANT_INLINE void adam(const float* __restrict g, const float* __restrict t, const float* __restrict dq,
                         const float* __restrict h, const float* __restrict scale, float* __restrict p,
                         float* __restrict m, float* __restrict v, int64_t size, const Regulariser reg, float lr_t,
                         float eps_t) {
  for (int64_t j = 0; j < size; ++j) {
    float d = 2.0f * (g[j] - t[j]) * scale[j] * dq[j];
    if (kRegulariser) {
      const float u = 2.0f * h[j] - 1.0f, au = std::fabs(u);
      // computed unconditionally, then selected: a select of values vectorises (with
      // -ftrapping-math GCC does not evaluate floating-point code a branch skips)
      const float pw = fast_pow_unit(au, reg.exponent);
      const float pj = au > 0.0f ? pw : reg.pow_at_zero;
      const float term = reg.scale * pj * (u > 0.0f ? 2.0f : -2.0f) * dq[j];
      d = dq[j] != 0.0f ? d - term : d;
    }
    m[j] = fma(kBeta1, m[j], (1.0f - kBeta1) * d);
    v[j] = fma(kBeta2, v[j], (1.0f - kBeta2) * d * d);
    p[j] = fma(-lr_t, m[j] / (std::sqrt(v[j]) + eps_t), p[j]);
  }
}

// Whether any of kPad floats has a bit set: a cheap test that no entry of a chunk changed
// (a change that is not one reads as nonzero only if it is -0, which the caller's != 0
// then skips).
PYQUANT_INLINE bool any_bits(const float* x) {
  uint64_t words[kPad / 2], any = 0;
  std::memcpy(words, x, sizeof words);
  for (int i = 0; i < kPad / 2; ++i) any |= words[i];
  return any != 0;
}

// The list of each row's changed entries and their count, for update_block. Listing is
// scalar (about 1.5 cycles an entry), so chunks without a change are skipped: once most
// entries are saturated, a row of 80 has about one change per iteration.
PYQUANT_INLINE void list_changes(BlockState& st, int n, int64_t kp) {
  for (int r = 0; r < n; ++r) {
    int32_t* cr = st.changed.data() + r * kp;
    int64_t c = 0;
    for (int64_t j0 = 0; j0 < kp; j0 += kPad) {
      const float* dr = st.delta.data() + r * kp + j0;
      if (!any_bits(dr)) continue;
      for (int l = 0; l < kPad; ++l) {  // without a branch: which entries changed is unpredictable
        cr[c] = int32_t(j0 + l);
        c += dr[l] != 0.0f;
      }
    }
    st.count[r] = c;
  }
}

PYQUANT_INLINE void fit_block_body(const Block& b, int qmin, int qmax, const RoundingOptions& o,
                                   const Schedule& sc) {
  const int64_t kp = b.kp, k = b.k, size = b.n * kp;
  BlockState st(b.n, kp);
  const bool adaround = o.algorithm == RoundingAlgorithm::AdaRound;
  for (int r = 0; r < b.n; ++r) {
    for (int64_t j = 0; j < kp; ++j) {
      const int64_t i = r * kp + j;
      st.scale[i] = b.scale[r];
      if (j >= k) {  // padding: w~ stays 0, no gradient
        st.param[i] = adaround ? kPaddingParam : 0.0f;
        continue;
      }
      const float w = b.weight[r * k + j], s = b.scale[r];
      st.t[i] = b.target[r * k + j];
      if (adaround) {
        const float fl = std::floor(w / s), frac = w / s - fl;
        st.base[i] = fl;
        // h(V) = frac: the soft weights start equal to the float weights.
        st.param[i] = -std::log((kZeta - kGamma) / (frac - kGamma) - 1.0f);
      } else {
        st.param[i] = w;
      }
    }
  }
  const float lo = float(qmin), hi = float(qmax);
  int updates_since_full = -1;  // < 0: g holds no product yet
  for (int64_t it = 0; it < o.iterations; ++it) {
    const int64_t total = soft_weights(st.param.data(), st.base.data(), st.scale.data(), st.h.data(), st.dq.data(),
                                       st.wt.data(), st.delta.data(), size, adaround, lo, hi);
    // g = w~ A. Saturated entries (h clamped to 0 or 1, q unchanged) keep their w~, so
    // after the first product only the changed entries' rows of A are added in; a full
    // product replaces the running sums when most entries changed, or after
    // kFullProductEvery updates (their rounding errors add up).
    if (updates_since_full < 0 || (total > 0 && (updates_since_full >= kFullProductEvery ||
                                                 double(total) > kFullProductFraction * double(b.n * k)))) {
      block_product(b, st.wt.data(), st.g.data());
      updates_since_full = 0;
    } else if (total > 0) {
      list_changes(st, b.n, kp);
      update_block(st.delta.data(), st.changed.data(), st.count.data(), b.n, b.gram, kp, st.g.data());
      ++updates_since_full;
    }
    const float beta = sc.beta[it];
    const Regulariser reg{adaround && it >= sc.warm, o.reg_param * beta, beta - 1.0f,
                          beta > 1.0f ? 0.0f : (beta == 1.0f ? 1.0f : INFINITY)};  // powf(0, beta - 1)
    if (reg.on)
      adam<true>(st.g.data(), st.t.data(), st.dq.data(), st.h.data(), st.scale.data(), st.param.data(), st.m.data(),
                 st.v.data(), size, reg, sc.lr[it], sc.eps[it]);
    else
      adam<false>(st.g.data(), st.t.data(), st.dq.data(), st.h.data(), st.scale.data(), st.param.data(), st.m.data(),
                  st.v.data(), size, reg, sc.lr[it], sc.eps[it]);
  }
  if (b.param_out)
    for (int r = 0; r < b.n; ++r)
      std::copy(st.param.begin() + r * kp, st.param.begin() + r * kp + k, b.param_out + r * k);
  // Hard rounding, and the nearest-rounding start for the keep_best guard.
  std::vector<float>& hard = st.wt;
  std::vector<float> nearest(b.n * kp, 0.f), g_nearest(b.n * kp, 0.f);
  for (int r = 0; r < b.n; ++r) {
    const float s = b.scale[r];
    for (int64_t j = 0; j < kp; ++j) {
      const int64_t i = r * kp + j;
      if (j >= k) {
        hard[i] = 0.0f;
        continue;
      }
      const float w = b.weight[r * k + j];
      const float q = adaround ? st.base[i] + (st.param[i] >= 0.0f ? 1.0f : 0.0f) : std::nearbyint(st.param[i] / s);
      hard[i] = s * std::min(hi, std::max(lo, q));
      nearest[i] = s * std::min(hi, std::max(lo, std::nearbyint(w / s)));
    }
  }
  block_product(b, hard.data(), st.g.data());
  block_product(b, nearest.data(), g_nearest.data());
  for (int r = 0; r < b.n; ++r) {
    const float* chosen = hard.data() + r * kp;
    if (o.keep_best) {
      const double learned = row_error(hard.data() + r * kp, st.g.data() + r * kp, st.t.data() + r * kp, k);
      const double start = row_error(nearest.data() + r * kp, g_nearest.data() + r * kp, st.t.data() + r * kp, k);
      if (!(learned < start)) chosen = nearest.data() + r * kp;
    }
    for (int64_t j = 0; j < k; ++j) b.out[r * k + j] = int8_t(std::nearbyint(chosen[j] / b.scale[r]));
  }
}

PYQUANT_CLONES(void, fit_block, (const Block& b, int qmin, int qmax, const RoundingOptions& o, const Schedule& sc),
               (b, qmin, qmax, o, sc))

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
  const float* grams[kRowBlock];
  std::fill(grams, grams + kRowBlock, a);
  update_block(delta, changed, count, n, grams, kp, g);
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
  const Schedule schedule = make_schedule(options);
  // A block: up to kRowBlock rows of one group, or as many whole groups of fewer rows as fit
  // (a depthwise layer's one-row groups, 8 at a time: their element-wise passes run as one).
  const int64_t groups_per_block = rows >= kRowBlock ? 1 : kRowBlock / rows;
  const int64_t blocks_per_group = rows >= kRowBlock ? (rows + kRowBlock - 1) / kRowBlock : 1;
  const int64_t blocks = (groups + groups_per_block - 1) / groups_per_block * blocks_per_group;
  const int64_t work = groups * rows * kp * kp * std::max<int64_t>(options.iterations, 1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(work, kFitRoundingMinParallel))
  for (int64_t bi = 0; bi < blocks; ++bi) {
    const int64_t g0 = bi / blocks_per_group * groups_per_block, r0 = (bi % blocks_per_group) * kRowBlock;
    const int64_t row = g0 * rows + r0;
    const int n = int(rows >= kRowBlock ? std::min<int64_t>(kRowBlock, rows - r0)
                                        : std::min(groups_per_block, groups - g0) * rows);
    Block b{weight + row * k, scale + row, target + row * k, {}, n, k, kp, out + row * k,
            param_out ? param_out + row * k : nullptr};
    for (int r = 0; r < n; ++r) b.gram[r] = grams[(row + r) / rows].data();
    fit_block(b, qmin, qmax, options, schedule);
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
