#include "kernels/window_gram.h"

#include <algorithm>
#include <vector>

#include "kernels/multiversion.h"
#include "kernels/parallel.h"

namespace pyquant {
namespace {

// Patches of one image and one group as rows: p[k * stride + pos], k = (channel, i, j).
// For each kernel column j the output columns whose input column lies inside the image
// are one range [lo, hi): zeros left and right of it, a copy (or a strided gather) inside;
// no bounds test per value.
void fill_patches(const float* x, int64_t h, int64_t w, int64_t cg, const ConvGeometry& g, float* p,
                  int64_t stride) {
  const int64_t m = stride;
  int64_t k = 0;
  for (int64_t ch = 0; ch < cg; ++ch) {
    const float* plane = x + ch * h * w;
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j, ++k) {
        float* row = p + k * m;
        // input column of output column ox: ox * stride_w + shift, inside when 0 <= . < w
        const int64_t shift = j * g.dil_w - g.pad_left;
        const int64_t lo = std::min(g.out_w, shift >= 0 ? 0 : (-shift + g.stride_w - 1) / g.stride_w);
        const int64_t hi = std::max(lo, std::min(g.out_w, w - shift <= 0 ? 0 : (w - shift - 1) / g.stride_w + 1));
        for (int64_t oy = 0; oy < g.out_h; ++oy) {
          const int64_t y = oy * g.stride_h + i * g.dil_h - g.pad_top;
          float* out = row + oy * g.out_w;
          if (y < 0 || y >= h) {
            std::fill(out, out + g.out_w, 0.0f);
            continue;
          }
          const float* src = plane + y * w;
          std::fill(out, out + lo, 0.0f);
          if (g.stride_w == 1) {
            std::copy(src + (lo + shift), src + (hi + shift), out + lo);
          } else {
            for (int64_t ox = lo; ox < hi; ++ox) out[ox] = src[ox * g.stride_w + shift];
          }
          std::fill(out + hi, out + g.out_w, 0.0f);
        }
      }
    }
  }
}

PYQUANT_INLINE float dot(const float* a, const float* b, int64_t m) {
  // 16 partial sums: vectorisable, and a fixed order (deterministic).
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= m; i += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[i + l] * b[i + l];
  float s = 0.0f;
  for (; i < m; ++i) s += a[i] * b[i];
  for (int l = 0; l < 16; ++l) s += acc[l];
  return s;
}

PYQUANT_INLINE float total(const float* a, int64_t m) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= m; i += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[i + l];
  float s = 0.0f;
  for (; i < m; ++i) s += a[i];
  for (int l = 0; l < 16; ++l) s += acc[l];
  return s;
}

// Multiply-adds (images x groups x K^2 x positions) below which one thread is faster, with
// threads over groups and over images.
// Measured by benchmarks/kernel_threads.py (2 cores, AVX-512, OMP_WAIT_POLICY=PASSIVE): the
// smallest work from which two threads were 1.1x faster at every larger size; repeated
// sweeps moved it by at most one step of the sweep (x3).
constexpr int64_t kWindowGramGroupsMinParallel = 1'000'000;
constexpr int64_t kWindowGramImagesMinParallel = 3'000'000;
// From this many groups each thread takes whole groups; below, images run in parallel. A
// constant, not a function of the thread count, so that the summation order (which differs
// between the two ways) does not depend on the threads.
constexpr int64_t kGroupParallelMinGroups = 4;

// Positions per block: the block's K rows of q and f stay in L1/L2 while all K^2 pairs use them.
constexpr int64_t kBlock = 512;

// Adds one image's patches of one group (pq, pf: [K, m]) to the accumulators. Without float
// patches (pf null) only qq and sq are touched; qf, ff and sf may then be null (the tiled
// accumulate_q below computes that case, in the same order).
PYQUANT_INLINE void accumulate_qf_body(const float* pq, const float* pf, int64_t K, int64_t m, double* qq, double* qf,
                                    double* ff, double* sq, double* sf) {
  for (int64_t c0 = 0; c0 < m; c0 += kBlock) {
    const int64_t len = std::min(kBlock, m - c0);
    for (int64_t a = 0; a < K; ++a) {
      const float* qa = pq + a * m + c0;
      const float* fa = pf ? pf + a * m + c0 : nullptr;
      sq[a] += total(qa, len);
      if (pf) sf[a] += total(fa, len);
      for (int64_t b = 0; b < K; ++b) {
        if (pf) qf[a * K + b] += dot(qa, pf + b * m + c0, len);
        if (b >= a) {
          const double vq = dot(qa, pq + b * m + c0, len);
          qq[a * K + b] += vq;
          if (b > a) qq[b * K + a] += vq;
          if (pf) {
            const double vf = dot(fa, pf + b * m + c0, len);
            ff[a * K + b] += vf;
            if (b > a) ff[b * K + a] += vf;
          }
        }
      }
    }
  }
}

PYQUANT_CLONES(void, accumulate_qf,
               (const float* pq, const float* pf, int64_t K, int64_t m, double* qq, double* qf, double* ff,
                double* sq, double* sf),
               (pq, pf, K, m, qq, qf, ff, sq, sf))

// Without float patches: the same sums as accumulate_body (each pair's dot product in the
// same order: 16 float lanes over the block, the tail, then the lanes in order; one double
// add per block), computed for a tile of T x T pairs at a time. The 16 lanes of a pair are
// one vector (one AVX-512 register; two AVX2 or four SSE registers) and the tile's rows are
// loaded once per step for all its pairs, instead of two loads per pair and step: the
// one-pair loop was bound by loads. A diagonal tile computes its upper triangle only.
typedef float Lanes __attribute__((vector_size(64)));

PYQUANT_INLINE Lanes load_lanes(const float* p) {
  Lanes v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

template <int R, int C, bool kDiagonal>
PYQUANT_INLINE void tile_sums(const float* pq, int64_t m, int64_t len, int64_t a0, int64_t b0, int64_t K,
                              double* qq) {
  Lanes acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Lanes{};
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    Lanes x[R], y[C];
    for (int r = 0; r < R; ++r) x[r] = load_lanes(pq + (a0 + r) * m + i);
    for (int c = 0; c < C; ++c) y[c] = kDiagonal ? x[c] : load_lanes(pq + (b0 + c) * m + i);
    for (int r = 0; r < R; ++r)
      for (int c = kDiagonal ? r : 0; c < C; ++c) acc[r][c] += x[r] * y[c];
  }
  for (int r = 0; r < R; ++r) {
    for (int c = kDiagonal ? r : 0; c < C; ++c) {
      const int64_t a = a0 + r, b = b0 + c;
      const float* qa = pq + a * m;
      const float* qb = pq + b * m;
      float s = 0.0f;
      for (int64_t j = i; j < len; ++j) s += qa[j] * qb[j];
      for (int l = 0; l < 16; ++l) s += acc[r][c][l];
      const double v = s;
      qq[a * K + b] += v;
      if (b > a) qq[b * K + a] += v;
    }
  }
}

// Rows [a0, a0 + R) against rows [b0, K) in tiles of C; b0 == a0 starts with the diagonal tile.
template <int T, int R>
PYQUANT_INLINE void tile_row(const float* pq, int64_t m, int64_t len, int64_t a0, int64_t K, double* qq) {
  tile_sums<R, R, true>(pq, m, len, a0, a0, K, qq);
  int64_t b0 = a0 + R;
  for (; b0 + T <= K; b0 += T) tile_sums<R, T, false>(pq, m, len, a0, b0, K, qq);
  switch (K - b0) {  // 0 <= K - b0 < T <= 4
    case 3: tile_sums<R, 3, false>(pq, m, len, a0, b0, K, qq); break;
    case 2: tile_sums<R, 2, false>(pq, m, len, a0, b0, K, qq); break;
    case 1: tile_sums<R, 1, false>(pq, m, len, a0, b0, K, qq); break;
    default: break;
  }
}

template <int T>
PYQUANT_INLINE void accumulate_tiled_body(const float* pq, int64_t K, int64_t m, double* qq, double* sq) {
  static_assert(T >= 1 && T <= 4, "tiles of up to 4 x 4 pairs");
  for (int64_t c0 = 0; c0 < m; c0 += kBlock) {
    const int64_t len = std::min(kBlock, m - c0);
    const float* block = pq + c0;
    for (int64_t a = 0; a < K; ++a) sq[a] += total(block + a * m, len);
    int64_t a0 = 0;
    for (; a0 + T <= K; a0 += T) tile_row<T, T>(block, m, len, a0, K, qq);
    switch (K - a0) {
      case 3: tile_row<T, 3>(block, m, len, a0, K, qq); break;
      case 2: tile_row<T, 2>(block, m, len, a0, K, qq); break;
      case 1: tile_row<T, 1>(block, m, len, a0, K, qq); break;
      default: break;
    }
  }
}

// Tiles of 4 x 4 pairs fill 16 of AVX-512's 32 registers; AVX2 and SSE hold a pair's lanes
// in 2 and 4 of their 16 registers, so 2 x 2.
PYQUANT_TARGET_AVX512 void accumulate_q_avx512(const float* pq, int64_t K, int64_t m, double* qq, double* sq) {
  accumulate_tiled_body<4>(pq, K, m, qq, sq);
}
PYQUANT_TARGET_AVX2 void accumulate_q_avx2(const float* pq, int64_t K, int64_t m, double* qq, double* sq) {
  accumulate_tiled_body<2>(pq, K, m, qq, sq);
}
void accumulate_q_baseline(const float* pq, int64_t K, int64_t m, double* qq, double* sq) {
  accumulate_tiled_body<2>(pq, K, m, qq, sq);
}

void accumulate(const float* pq, const float* pf, int64_t K, int64_t m, double* qq, double* qf, double* ff,
                double* sq, double* sf) {
  if (pf == nullptr) {
    switch (::pyquant::active_isa()) {
      case Isa::Avx512: return accumulate_q_avx512(pq, K, m, qq, sq);
      case Isa::Avx2: return accumulate_q_avx2(pq, K, m, qq, sq);
      default: return accumulate_q_baseline(pq, K, m, qq, sq);
    }
  }
  accumulate_qf(pq, pf, K, m, qq, qf, ff, sq, sf);
}

// Where one group's sums live in a block of doubles: qq [K, K] and sum_q [K], then with
// float inputs qf [K, K], ff [K, K] and sum_f [K].
struct GroupSums {
  int64_t K, kk;
  bool with_f;
  int64_t size() const { return with_f ? 3 * kk + 2 * K : kk + K; }
  double* qq(double* base) const { return base; }
  double* sum_q(double* base) const { return base + kk; }
  double* qf(double* base) const { return with_f ? base + kk + K : nullptr; }
  double* ff(double* base) const { return with_f ? base + 2 * kk + K : nullptr; }
  double* sum_f(double* base) const { return with_f ? base + 3 * kk + K : nullptr; }
};

}  // namespace

void window_gram(const float* q, const float* f, int64_t n, int64_t c, int64_t h, int64_t w, int64_t groups,
                 const ConvGeometry& geo, double* qq, double* qf, double* ff, double* sum_q, double* sum_f) {
  if (n <= 0 || groups <= 0) return;
  const int64_t cg = c / groups, K = cg * geo.kh * geo.kw, m = geo.out_h * geo.out_w;
  const int64_t kk = K * K;
  const int64_t work = n * groups * kk * m;
  if (groups >= kGroupParallelMinGroups) {
    const int threads = threads_for(work, kWindowGramGroupsMinParallel);
    // Depthwise-like: each thread owns whole groups; the patches of all images of a
    // group side by side, so that the dot products are long even on small feature maps.
    const int64_t mn = m * n;
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> pq(K * mn), pf(f ? K * mn : 0);
#pragma omp for schedule(dynamic, 1)
      for (int64_t gi = 0; gi < groups; ++gi) {
        for (int64_t img = 0; img < n; ++img) {
          const int64_t off = (img * c + gi * cg) * h * w;
          fill_patches(q + off, h, w, cg, geo, pq.data() + img * m, mn);
          if (f) fill_patches(f + off, h, w, cg, geo, pf.data() + img * m, mn);
        }
        if (f)
          accumulate(pq.data(), pf.data(), K, mn, qq + gi * kk, qf + gi * kk, ff + gi * kk, sum_q + gi * K,
                     sum_f + gi * K);
        else
          accumulate(pq.data(), nullptr, K, mn, qq + gi * kk, nullptr, nullptr, sum_q + gi * K, nullptr);
      }
    }
    return;
  }
  // Few groups (a full convolution): images in parallel into per-image partial sums,
  // added in image order afterwards. Without f, only qq and sum_q have partials.
  const int threads = threads_for(work, kWindowGramImagesMinParallel);
  const GroupSums layout{K, kk, f != nullptr};
  const int64_t per = groups * layout.size();
  std::vector<double> partial(n * per, 0.0);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> pq(K * m), pf(f ? K * m : 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t img = 0; img < n; ++img) {
      for (int64_t gi = 0; gi < groups; ++gi) {
        double* acc = partial.data() + img * per + gi * layout.size();
        const int64_t off = (img * c + gi * cg) * h * w;
        fill_patches(q + off, h, w, cg, geo, pq.data(), m);
        if (f) fill_patches(f + off, h, w, cg, geo, pf.data(), m);
        accumulate(pq.data(), f ? pf.data() : nullptr, K, m, layout.qq(acc), layout.qf(acc), layout.ff(acc),
                   layout.sum_q(acc), layout.sum_f(acc));
      }
    }
  }
  for (int64_t img = 0; img < n; ++img) {
    for (int64_t gi = 0; gi < groups; ++gi) {
      double* acc = partial.data() + img * per + gi * layout.size();
      for (int64_t i = 0; i < kk; ++i) qq[gi * kk + i] += layout.qq(acc)[i];
      for (int64_t i = 0; i < K; ++i) sum_q[gi * K + i] += layout.sum_q(acc)[i];
      if (!f) continue;
      for (int64_t i = 0; i < kk; ++i) {
        qf[gi * kk + i] += layout.qf(acc)[i];
        ff[gi * kk + i] += layout.ff(acc)[i];
      }
      for (int64_t i = 0; i < K; ++i) sum_f[gi * K + i] += layout.sum_f(acc)[i];
    }
  }
}

}  // namespace pyquant
