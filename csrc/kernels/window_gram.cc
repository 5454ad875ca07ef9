#include "kernels/window_gram.h"

#include <algorithm>
#include <vector>

#include "kernels/multiversion.h"
#include "kernels/parallel.h"

namespace pyquant {
namespace {

// Patches of one image and one group as rows: p[k * stride + pos], k = (channel, i, j).
void fill_patches(const float* x, int64_t h, int64_t w, int64_t cg, const ConvGeometry& g, float* p,
                  int64_t stride) {
  const int64_t m = stride;
  int64_t k = 0;
  for (int64_t ch = 0; ch < cg; ++ch) {
    const float* plane = x + ch * h * w;
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j, ++k) {
        float* row = p + k * m;
        for (int64_t oy = 0; oy < g.out_h; ++oy) {
          const int64_t y = oy * g.stride_h + i * g.dil_h - g.pad_top;
          float* out = row + oy * g.out_w;
          if (y < 0 || y >= h) {
            std::fill(out, out + g.out_w, 0.0f);
            continue;
          }
          const float* src = plane + y * w;
          for (int64_t ox = 0; ox < g.out_w; ++ox) {
            const int64_t xx = ox * g.stride_w + j * g.dil_w - g.pad_left;
            out[ox] = (xx >= 0 && xx < w) ? src[xx] : 0.0f;
          }
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
// patches (pf null) only qq and sq are touched; qf, ff and sf may then be null.
PYQUANT_INLINE void accumulate_body(const float* pq, const float* pf, int64_t K, int64_t m, double* qq, double* qf,
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

PYQUANT_CLONES(void, accumulate,
               (const float* pq, const float* pf, int64_t K, int64_t m, double* qq, double* qf, double* ff,
                double* sq, double* sf),
               (pq, pf, K, m, qq, qf, ff, sq, sf))

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
