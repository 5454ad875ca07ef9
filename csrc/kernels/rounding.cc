#include "kernels/rounding.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/multiversion.h"
#include "kernels/parallel.h"

#if PYQUANT_X86_LEVELS
#include <immintrin.h>  // declares the AVX2/AVX-512 builtins the level copies call
#endif

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
// |V| from which h(V) is clamped to 0 or 1 (exactly at ln 11 = 2.398, with a margin for
// fast_exp's error: at 2.5, h_raw is 1.009 or -0.009): a vector of 16 entries all beyond it
// skips the sigmoid, with the bits computing it would give.
constexpr float kSaturatedParam = 2.5f;
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
// Frozen entries (see frozen_mask16()) are dropped from the element-wise loops once they are
// at least 1/kCompactFraction of the active ones.
constexpr int64_t kCompactFraction = 8;


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

// Fast element functions of the loop, from adds, multiplies, fused multiply-adds, divisions
// and bit operations only (no libm), on vectors: every x86-64 level computes the same bits
// (each lane does the same operations in the same order; fma is rounded once on every
// level). libm's scalar expf/powf per weight per iteration were most of the time on small
// layers (benchmarks/fit_rounding.py).

// AdaRound's element-wise passes in explicit vectors of 16 floats (GCC's vector extension:
// each level does the same lane operations, AVX2 in two halves, the baseline in four SSE
// quarters), so that a vector whose 16 entries are all saturated can skip the sigmoid and
// the regulariser's power, which a compiler-vectorised loop computes for every entry. What
// the extension lacks or GCC 12 splits into lanes (fused multiply-add, square root, min and
// max, selects, testing and counting lanes) comes from each level's builtins, and on the
// baseline from a loop over the lanes of the same scalar operation (fmaf and sqrtf are
// correctly rounded): every level gives the same bits.
typedef float Floats16 __attribute__((vector_size(64)));
typedef int32_t Ints16 __attribute__((vector_size(64)));
typedef float Floats8 __attribute__((vector_size(32)));


PYQUANT_INLINE Floats16 load16(const float* p) {
  Floats16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}


PYQUANT_INLINE Ints16 load16(const int32_t* p) {
  Ints16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

PYQUANT_INLINE Floats16 abs16(Floats16 a) { return (Floats16)((Ints16)a & 0x7fffffff); }

#if PYQUANT_X86_LEVELS
constexpr int kCurrentRounding = 4;  // _MM_FROUND_CUR_DIRECTION
constexpr int kLessOrdered = 0x11;   // _CMP_LT_OQ
constexpr int kNotEqual = 0x04;      // _CMP_NEQ_UQ, C's !=

// f on the two 8-float halves of a (AVX2).
template <typename F>
PYQUANT_INLINE Floats16 on_halves(Floats16 a, F f) {
  Floats8 h[2];
  std::memcpy(h, &a, sizeof a);
  h[0] = f(h[0]);
  h[1] = f(h[1]);
  std::memcpy(&a, h, sizeof a);
  return a;
}

// f on the matching 8-float halves of a and b (AVX2).
template <typename F>
PYQUANT_INLINE Floats16 on_halves(Floats16 a, Floats16 b, F f) {
  Floats8 ha[2], hb[2];
  std::memcpy(ha, &a, sizeof a);
  std::memcpy(hb, &b, sizeof b);
  ha[0] = f(ha[0], hb[0]);
  ha[1] = f(ha[1], hb[1]);
  std::memcpy(&a, ha, sizeof a);
  return a;
}
#endif

// x in every lane. At AVX2 from one 8-float broadcast: GCC 12 built a 16-float splat there
// lane by lane on the stack and reloaded it in 16-byte pieces (a store-forwarding stall at
// every broadcast of the products' inner loop).
template <Isa L>
PYQUANT_INLINE Floats16 splat(float x) {
#if PYQUANT_X86_LEVELS
  if constexpr (L == Isa::Avx2) {
    const Floats8 half = Floats8{} + x;
    const Floats8 halves[2] = {half, half};
    Floats16 v;
    std::memcpy(&v, halves, sizeof v);
    return v;
  }
#endif
  return Floats16{} + x;
}

// Stores of a vector. At AVX2 in two 32-byte halves: GCC 12 compiles a 64-byte memcpy there
// through the stack and reloads it in 8-byte pieces (store-forwarding stalls on every store of
// the element-wise loops: the AVX2 copy of fit_rounding ran 12x slower than AVX-512's on
// 1x1 80 -> 480, against 1.5x on the large layers).
// (Floats16 into float memory, Ints16 into int32_t memory; the halves go out as bytes.)
template <Isa L, typename T, typename Vector>
PYQUANT_INLINE void store16(T* p, Vector v) {
  static_assert(sizeof(Vector) == 16 * sizeof(T), "a vector of 16 T");
#if PYQUANT_X86_LEVELS
  if constexpr (L == Isa::Avx2) {
    typedef char Bytes32 __attribute__((vector_size(32)));
    Bytes32 h[2];
    std::memcpy(h, &v, sizeof v);
    __builtin_ia32_storedqu256(reinterpret_cast<char*>(p), h[0]);
    __builtin_ia32_storedqu256(reinterpret_cast<char*>(p) + 32, h[1]);
    return;
  }
#endif
  std::memcpy(p, &v, sizeof v);
}

// a * b + c rounded once, per lane.
template <Isa L>
PYQUANT_INLINE Floats16 fma16(Floats16 a, Floats16 b, Floats16 c) {
#if PYQUANT_X86_LEVELS
  if constexpr (L == Isa::Avx512) return __builtin_ia32_vfmaddps512_mask(a, b, c, -1, kCurrentRounding);
  if constexpr (L == Isa::Avx2) {
    Floats8 a2[2], b2[2], c2[2];
    std::memcpy(a2, &a, sizeof a);
    std::memcpy(b2, &b, sizeof b);
    std::memcpy(c2, &c, sizeof c);
    a2[0] = __builtin_ia32_vfmaddps256(a2[0], b2[0], c2[0]);
    a2[1] = __builtin_ia32_vfmaddps256(a2[1], b2[1], c2[1]);
    std::memcpy(&a, a2, sizeof a);
    return a;
  }
#endif
  for (int l = 0; l < 16; ++l) a[l] = fma(a[l], b[l], c[l]);
  return a;
}

template <Isa L>
PYQUANT_INLINE Floats16 sqrt16(Floats16 a) {
#if PYQUANT_X86_LEVELS
  if constexpr (L == Isa::Avx512) return __builtin_ia32_sqrtps512_mask(a, a, -1, kCurrentRounding);
  if constexpr (L == Isa::Avx2) return on_halves(a, [](Floats8 h) { return __builtin_ia32_sqrtps256(h); });
#endif
  for (int l = 0; l < 16; ++l) a[l] = std::sqrt(a[l]);
  return a;
}

// std::min(a, b) and std::max(a, b) per lane (x86's minps(x, y) is x < y ? x : y).
template <Isa L>
PYQUANT_INLINE Floats16 min16(Floats16 a, Floats16 b) {
#if PYQUANT_X86_LEVELS
  if constexpr (L == Isa::Avx512) return __builtin_ia32_minps512_mask(b, a, a, -1, kCurrentRounding);
  if constexpr (L == Isa::Avx2)
    return on_halves(a, b, [](Floats8 x, Floats8 y) { return __builtin_ia32_minps256(y, x); });
#endif
  for (int l = 0; l < 16; ++l) a[l] = std::min(a[l], b[l]);
  return a;
}

template <Isa L>
PYQUANT_INLINE Floats16 max16(Floats16 a, Floats16 b) {
#if PYQUANT_X86_LEVELS
  if constexpr (L == Isa::Avx512) return __builtin_ia32_maxps512_mask(b, a, a, -1, kCurrentRounding);
  if constexpr (L == Isa::Avx2)
    return on_halves(a, b, [](Floats8 x, Floats8 y) { return __builtin_ia32_maxps256(y, x); });
#endif
  for (int l = 0; l < 16; ++l) a[l] = std::max(a[l], b[l]);
  return a;
}

// x where a < b, else y, per lane. (GCC 12 splits a vector ?: into lanes at AVX-512 when
// it needs the comparison as a vector of integers, so the levels' compare and blend.)
template <Isa L>
PYQUANT_INLINE Floats16 select_less(Floats16 a, Floats16 b, Floats16 x, Floats16 y) {
#if PYQUANT_X86_LEVELS
  if constexpr (L == Isa::Avx512)
    return __builtin_ia32_blendmps_512_mask(y, x, __builtin_ia32_cmpps512_mask(a, b, kLessOrdered, -1, kCurrentRounding));
  if constexpr (L == Isa::Avx2) {
    Floats8 a2[2], b2[2], x2[2], y2[2];
    std::memcpy(a2, &a, sizeof a);
    std::memcpy(b2, &b, sizeof b);
    std::memcpy(x2, &x, sizeof x);
    std::memcpy(y2, &y, sizeof y);
    for (int i = 0; i < 2; ++i) y2[i] = __builtin_ia32_blendvps256(y2[i], x2[i], __builtin_ia32_cmpps256(a2[i], b2[i], kLessOrdered));
    std::memcpy(&y, y2, sizeof y);
    return y;
  }
#endif
  for (int l = 0; l < 16; ++l) y[l] = a[l] < b[l] ? x[l] : y[l];
  return y;
}

// How many lanes of a are != 0.
template <Isa L>
PYQUANT_INLINE int count_nonzero16(Floats16 a) {
  const Floats16 zero = {};
#if PYQUANT_X86_LEVELS
  if constexpr (L == Isa::Avx512)
    return __builtin_popcount(__builtin_ia32_cmpps512_mask(a, zero, kNotEqual, -1, kCurrentRounding));
  if constexpr (L == Isa::Avx2) {
    Floats8 a2[2];
    const Floats8 zero8 = {};
    std::memcpy(a2, &a, sizeof a);
    return __builtin_popcount(__builtin_ia32_movmskps256(__builtin_ia32_cmpps256(a2[0], zero8, kNotEqual))) +
           __builtin_popcount(__builtin_ia32_movmskps256(__builtin_ia32_cmpps256(a2[1], zero8, kNotEqual)));
  }
#endif
  int n = 0;
  for (int l = 0; l < 16; ++l) n += a[l] != 0.0f;
  return n;
}

// Bit l set where a[l] < b[l].
template <Isa L>
PYQUANT_INLINE uint32_t less_mask16(Floats16 a, Floats16 b) {
#if PYQUANT_X86_LEVELS
  if constexpr (L == Isa::Avx512) return __builtin_ia32_cmpps512_mask(a, b, kLessOrdered, -1, kCurrentRounding);
  if constexpr (L == Isa::Avx2) {
    Floats8 m[2];
    const Floats16 less = (Floats16)(a < b);
    std::memcpy(m, &less, sizeof less);
    return uint32_t(__builtin_ia32_movmskps256(m[0])) | uint32_t(__builtin_ia32_movmskps256(m[1])) << 8;
  }
#endif
  uint32_t mask = 0;
  for (int l = 0; l < 16; ++l) mask |= uint32_t(a[l] < b[l]) << l;
  return mask;
}

// Bit l set where a[l] != 0.
template <Isa L>
PYQUANT_INLINE uint32_t nonzero_mask16(Floats16 a) {
#if PYQUANT_X86_LEVELS
  if constexpr (L == Isa::Avx512) return __builtin_ia32_cmpps512_mask(a, Floats16{}, kNotEqual, -1, kCurrentRounding);
  if constexpr (L == Isa::Avx2) {
    Floats8 a2[2];
    const Floats8 zero8 = {};
    std::memcpy(a2, &a, sizeof a);
    return uint32_t(__builtin_ia32_movmskps256(__builtin_ia32_cmpps256(a2[0], zero8, kNotEqual))) |
           uint32_t(__builtin_ia32_movmskps256(__builtin_ia32_cmpps256(a2[1], zero8, kNotEqual))) << 8;
  }
#endif
  uint32_t mask = 0;
  for (int l = 0; l < 16; ++l) mask |= uint32_t(a[l] != 0.0f) << l;
  return mask;
}

// The lanes of a whose bit is set in mask, in order, at the front (the other lanes 0): what
// the list of changes and compact() keep, as vpcompressd does it.
template <Isa L>
PYQUANT_INLINE Ints16 compress16(Ints16 a, uint32_t mask) {
#if PYQUANT_X86_LEVELS
  if constexpr (L == Isa::Avx512) return __builtin_ia32_compresssi512_mask(a, Ints16{}, mask);
#endif
  Ints16 out = {};
  for (int l = 0, c = 0; l < 16; ++l)
    if (mask >> l & 1) out[c++] = a[l];
  return out;
}

template <Isa L>
PYQUANT_INLINE Floats16 compress16(Floats16 a, uint32_t mask) {
#if PYQUANT_X86_LEVELS
  if constexpr (L == Isa::Avx512) return __builtin_ia32_compresssf512_mask(a, Floats16{}, mask);
#endif
  return (Floats16)compress16<L>((Ints16)a, mask);
}

// x[idx[l]] per lane.
template <Isa L>
PYQUANT_INLINE Floats16 gather16(const float* x, Ints16 idx) {
#if PYQUANT_X86_LEVELS
  if constexpr (L == Isa::Avx512) return __builtin_ia32_gathersiv16sf(Floats16{}, x, idx, 0xffff, 4);
#endif
  Floats16 out;
  for (int l = 0; l < 16; ++l) out[l] = x[idx[l]];
  return out;
}

// Whether a < b in any lane.
template <Isa L>
PYQUANT_INLINE bool any_less16(Floats16 a, Floats16 b) {
#if PYQUANT_X86_LEVELS
  if constexpr (L == Isa::Avx512) return __builtin_ia32_cmpps512_mask(a, b, kLessOrdered, -1, kCurrentRounding) != 0;
  if constexpr (L == Isa::Avx2) {
    Floats8 m[2];
    const Floats16 less = (Floats16)(a < b);
    std::memcpy(m, &less, sizeof less);
    return (__builtin_ia32_movmskps256(m[0]) | __builtin_ia32_movmskps256(m[1])) != 0;
  }
#endif
  uint64_t words[8];
  const Ints16 less = a < b;
  std::memcpy(words, &less, sizeof words);
  uint64_t any = 0;
  for (uint64_t w : words) any |= w;
  return any != 0;
}

// e^x within 2 ulp: x = n ln2 + r (Cody-Waite, |r| <= ln2/2), e^r by its Taylor series to
// r^7 (truncation below 5e-9 relative), times 2^n built in the exponent bits. 0 below
// -87 and inf above 88 (e^-87 is 1.6e-38, near the smallest normal float).
template <Isa L>
PYQUANT_INLINE Floats16 fast_exp16(Floats16 x) {
  constexpr float kLog2e = 1.44269504f, kLn2Hi = 0.693145752f, kLn2Lo = 1.42860677e-6f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const Floats16 xc = min16<L>(splat<L>(88.0f), max16<L>(splat<L>(-87.0f), x));
  const Floats16 n = fma16<L>(xc, splat<L>(kLog2e), splat<L>(kRound)) - splat<L>(kRound);
  const Floats16 r = fma16<L>(-n, splat<L>(kLn2Lo), fma16<L>(-n, splat<L>(kLn2Hi), xc));
  Floats16 p = splat<L>(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
    p = fma16<L>(p, r, splat<L>(c));
  const Ints16 n_int = __builtin_convertvector(n, Ints16);
  const Floats16 e = p * (Floats16)((n_int + 127) << 23);
  const Floats16 finite = select_less<L>(splat<L>(88.0f), x, splat<L>(INFINITY), e);
  return select_less<L>(x, splat<L>(-87.0f), splat<L>(0.0f), finite);
}

// ln(x) for normal x > 0 within 2 ulp: x = 2^e m, m in [sqrt(1/2), sqrt(2)), ln m =
// 2 atanh(s) with s = (m - 1) / (m + 1), |s| <= 0.172, by its series to s^11.
// Subnormal x read as if normal (a wrong but finite, very negative logarithm).
template <Isa L>
PYQUANT_INLINE Floats16 fast_log16(Floats16 x) {
  constexpr float kLn2 = 0.693147181f;
  const Ints16 bits = (Ints16)x;
  Floats16 m = (Floats16)((bits & 0x007fffff) | 0x3f800000);
  Floats16 e = __builtin_convertvector((bits >> 23) - 127, Floats16);
  const Floats16 sqrt2 = splat<L>(1.41421356f);
  e = select_less<L>(sqrt2, m, e + splat<L>(1.0f), e);
  m = select_less<L>(sqrt2, m, m * splat<L>(0.5f), m);
  const Floats16 s = (m - splat<L>(1.0f)) / (m + splat<L>(1.0f)), s2 = s * s;
  Floats16 p = splat<L>(1.0f / 11.0f);
  for (const float c : {1.0f / 9.0f, 1.0f / 7.0f, 1.0f / 5.0f, 1.0f / 3.0f, 1.0f}) p = fma16<L>(p, s2, splat<L>(c));
  return fma16<L>(e, splat<L>(kLn2), splat<L>(2.0f) * s * p);
}

#if PYQUANT_X86_LEVELS
PYQUANT_INLINE Floats8 load8(const float* p) {
  Floats8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// N accumulators of 16 floats as 8-float halves, for the products' inner loops at AVX2: GCC
// 12 has no register form for a 16-float vector without AVX-512 and kept Floats16
// accumulators on the stack (the AVX2 fit of 1x1 80 -> 480 ran 5.6x slower than AVX-512's).
// The lanes see the same fused multiply-adds and adds as in Floats16, so the same bits.
template <int N>
struct Accumulators8 {
  Floats8 low[N] = {}, high[N] = {};

  PYQUANT_INLINE void fma(int i, Floats8 x, Floats8 a_low, Floats8 a_high) {
    low[i] = __builtin_ia32_vfmaddps256(x, a_low, low[i]);
    high[i] = __builtin_ia32_vfmaddps256(x, a_high, high[i]);
  }
  PYQUANT_INLINE void store(int i, float* p) const {
    __builtin_ia32_storeups256(p, low[i]);
    __builtin_ia32_storeups256(p + 8, high[i]);
  }
  PYQUANT_INLINE void add_to(int i, float* p) const {
    __builtin_ia32_storeups256(p, load8(p) + low[i]);
    __builtin_ia32_storeups256(p + 8, load8(p + 8) + high[i]);
  }
};
#endif

// The same tile for 16 columns, in explicit vectors: GCC 12 vectorised product_tile<R, 16>
// across the rows, with a transposition of the accumulators at every k (kp = 80 ran at a
// third of the speed of kp = 64 per multiply-add).
template <Isa L, int R>
PYQUANT_INLINE void product_tile16(const float* x, const float* a, int64_t kp, int64_t j0, float* out) {
#if PYQUANT_X86_LEVELS
  if constexpr (L == Isa::Avx2) {  // in 8-float halves: see Accumulators8
    Accumulators8<R> acc;
    for (int64_t k = 0; k < kp; ++k) {
      const float* ak = a + k * kp + j0;
      const Floats8 low = load8(ak), high = load8(ak + 8);
      for (int r = 0; r < R; ++r) acc.fma(r, Floats8{} + x[r * kp + k], low, high);
    }
    for (int r = 0; r < R; ++r) acc.store(r, out + r * kp + j0);
    return;
  }
#endif
  Floats16 acc[R] = {};
  for (int64_t k = 0; k < kp; ++k) {
    const Floats16 ak = load16(a + k * kp + j0);
    for (int r = 0; r < R; ++r) acc[r] = fma16<L>(splat<L>(x[r * kp + k]), ak, acc[r]);
  }
  for (int r = 0; r < R; ++r) store16<L>(out + r * kp + j0, acc[r]);
}

template <Isa L, int R>
PYQUANT_INLINE void product_rows(const float* x, const float* a, int64_t kp, float* out) {
  int64_t j0 = 0;
  for (; j0 + 32 <= kp; j0 += 32) product_tile<R, 32>(x, a, kp, j0, out);
  for (; j0 < kp; j0 += 16) product_tile16<L, R>(x, a, kp, j0, out);
}

// out[n, kp] = x[n, kp] @ a[kp, kp] for n <= kRowBlock rows (kp a multiple of kPad).
template <Isa L>
PYQUANT_INLINE void product_block(const float* x, const float* a, int n, int64_t kp, float* out) {
  switch (n) {
    case 8: product_rows<L, 8>(x, a, kp, out); break;
    case 7: product_rows<L, 7>(x, a, kp, out); break;
    case 6: product_rows<L, 6>(x, a, kp, out); break;
    case 5: product_rows<L, 5>(x, a, kp, out); break;
    case 4: product_rows<L, 4>(x, a, kp, out); break;
    case 3: product_rows<L, 3>(x, a, kp, out); break;
    case 2: product_rows<L, 2>(x, a, kp, out); break;
    default: product_rows<L, 1>(x, a, kp, out); break;
  }
}

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
template <Isa L>
PYQUANT_INLINE void block_product(const Block& b, const float* x, float* out) {
  for (int r0 = 0, r1 = 0; r0 < b.n; r0 = r1) {
    for (r1 = r0 + 1; r1 < b.n && b.gram[r1] == b.gram[r0];) ++r1;
    product_block<L>(x + r0 * b.kp, b.gram[r0], r1 - r0, b.kp, out + r0 * b.kp);
  }
}

// sum_j wt[j] * (g[j] - 2 t[j]) = w~ A w~^T - 2 w~ . t, without the constant c_r.
double row_error(const float* wt, const float* g, const float* t, int64_t k) {
  double e = 0.0;
  for (int64_t j = 0; j < k; ++j) e += double(wt[j]) * (double(g[j]) - 2.0 * double(t[j]));
  return e;
}

// g[cols c0..c0+16V) += (sum over the list, in its order, of change[i] * a[changed[i], cols]):
// one row's product updated for the entries of w~ that changed. In this form (V vectors
// unrolled, flat sums) GCC 12 keeps the V sums in registers at every level; one loop over
// the 16V columns, or sums shaped [1][16], kept them in memory, one float at a time.
template <int V>
PYQUANT_INLINE void update_tile(const float* change, const int32_t* changed, int64_t count, const float* a,
                                int64_t kp, int64_t c0, float* g) {
  float acc[kPad * V] = {};
  for (int64_t i = 0; i < count; ++i) {
    const int64_t j = changed[i];
    const float d = change[i];
    const float* aj = a + j * kp + c0;
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      for (int l = 0; l < kPad; ++l) acc[kPad * v + l] = fma(d, aj[kPad * v + l], acc[kPad * v + l]);
  }
  for (int c = 0; c < kPad * V; ++c) g[c0 + c] += acc[c];
}

// The same in explicit vectors, for V = 1 to 8 (rows of up to 128 columns in one pass): GCC
// 12 compiled update_tile<1> to scalar multiply-adds (at least 7 % of 1x1 80 -> 480's samples
// in `perf`), and a row of 80 in tiles of 64 and 16 walked its list twice, the 16-column
// pass one dependent multiply-add after the other.
template <Isa L, int V>
PYQUANT_INLINE void update_vectors(const float* change, const int32_t* changed, int64_t count, const float* a,
                                   int64_t kp, int64_t c0, float* g) {
#if PYQUANT_X86_LEVELS
  if constexpr (L == Isa::Avx2) {  // in 8-float halves: see Accumulators8
    Accumulators8<V> acc;
    for (int64_t i = 0; i < count; ++i) {
      const float* aj = a + changed[i] * kp + c0;
      const Floats8 d = Floats8{} + change[i];
      for (int v = 0; v < V; ++v) acc.fma(v, d, load8(aj + kPad * v), load8(aj + kPad * v + 8));
    }
    for (int v = 0; v < V; ++v) acc.add_to(v, g + c0 + kPad * v);
    return;
  }
#endif
  Floats16 acc[V] = {};
  for (int64_t i = 0; i < count; ++i) {
    const float* aj = a + changed[i] * kp + c0;
    const Floats16 d = splat<L>(change[i]);
    for (int v = 0; v < V; ++v) acc[v] = fma16<L>(d, load16(aj + kPad * v), acc[v]);
  }
  for (int v = 0; v < V; ++v) store16<L>(g + c0 + kPad * v, load16(g + c0 + kPad * v) + acc[v]);
}

template <Isa L, int V>
PYQUANT_INLINE void update_rows_of(const float* change, const int32_t* changed, const int64_t* count, int n,
                                   const float* const* a, int64_t kp, float* g) {
  for (int r = 0; r < n; ++r)
    if (count[r]) update_vectors<L, V>(change + r * kp, changed + r * kp, count[r], a[r], kp, 0, g + r * kp);
}

// g[r] += (w~ - w~_prev)[r] @ a[r] over row r's changed entries, for the n rows of a block:
// row r's list is changed[r * kp ..] (columns, ascending) and change[r * kp ..] (the changes),
// count[r] long. Rows of up to 128 columns in one pass; wider ones by column tiles outer,
// rows inner: a tile's columns of a stay in cache across the rows.
template <Isa L>
PYQUANT_INLINE void update_block(const float* change, const int32_t* changed, const int64_t* count, int n,
                                 const float* const* a, int64_t kp, float* g) {
  switch (kp / kPad) {
    case 1: return update_rows_of<L, 1>(change, changed, count, n, a, kp, g);
    case 2: return update_rows_of<L, 2>(change, changed, count, n, a, kp, g);
    case 3: return update_rows_of<L, 3>(change, changed, count, n, a, kp, g);
    case 4: return update_rows_of<L, 4>(change, changed, count, n, a, kp, g);
    case 5: return update_rows_of<L, 5>(change, changed, count, n, a, kp, g);
    case 6: return update_rows_of<L, 6>(change, changed, count, n, a, kp, g);
    case 7: return update_rows_of<L, 7>(change, changed, count, n, a, kp, g);
    case 8: return update_rows_of<L, 8>(change, changed, count, n, a, kp, g);
    default: break;
  }
  int64_t c0 = 0;
  for (; c0 + 64 <= kp; c0 += 64)
    for (int r = 0; r < n; ++r)
      if (count[r]) update_tile<4>(change + r * kp, changed + r * kp, count[r], a[r], kp, c0, g + r * kp);
  for (; c0 + 32 <= kp; c0 += 32)
    for (int r = 0; r < n; ++r)
      if (count[r]) update_tile<2>(change + r * kp, changed + r * kp, count[r], a[r], kp, c0, g + r * kp);
  for (; c0 < kp; c0 += kPad)
    for (int r = 0; r < n; ++r)
      if (count[r]) update_vectors<L, 1>(change + r * kp, changed + r * kp, count[r], a[r], kp, c0, g + r * kp);
}

// Bit l set where AdaRound's entry l is frozen: |V| >= kSaturatedParam, so h is clamped and
// dq = 0, which makes its gradient 0, and its momentum m does not point back inwards (V > 0
// and m <= 0, or V < 0 and m >= 0). With a zero gradient m only decays, keeping its sign, so
// each later step moves V further out: the entry's soft weight and hard rounding (the sign
// of V) stay what they are to the end. Padded entries (V = kPaddingParam, m = 0) are frozen.
template <Isa L>
PYQUANT_INLINE uint32_t frozen_mask16(Floats16 param, Floats16 m) {
  // m with its sign flipped where V < 0: positive exactly where m points inwards
  const Floats16 inward = (Floats16)((Ints16)m ^ ((Ints16)param & INT32_MIN));
  return ~(less_mask16<L>(abs16(param), splat<L>(kSaturatedParam)) | less_mask16<L>(Floats16{}, inward)) & 0xffffu;
}

// The state of a block's entries. The element-wise loops (soft weights, listing the changes,
// gradient, Adam) run over a packed list of the active entries: each array holds, at i, the
// entry at position pos[i] = r * kp + j of the block's [n, kp] rows, in order of position,
// padded to a multiple of kPad with neutral entries (scale 0, so w~ = 0 and no gradient).
// At first the list is every entry, in place (identity): the products read and write the
// packed arrays. Once enough AdaRound entries are frozen, compact() drops them (on Lite0's
// 1x1 80 -> 480 layer, 60 % of the entries 20 iterations after the 120 of the warm start, 90 %
// by iteration 400, when 80 % of the 16-entry vectors still hold an active one), and the products
// work on the row-major copies wt_rows and g_rows: the soft weights of the active entries
// are written there before each full product (frozen entries' last ones, which stay, when
// they are dropped), and the active entries' products read from there before each Adam step.
struct BlockState {
  int64_t active;  // entries in the list
  bool identity;   // pos[i] == i for every position: no entry dropped yet
  std::vector<int32_t> pos;
  // packed: scale is the row's scale at each entry, so that the loops run once over the
  // block, not per row (a depthwise layer's rows are 25 wide)
  std::vector<float> param, m, v, base, scale, t, wt, delta, dq, h, g;
  std::vector<int64_t> row_end;  // row r's entries are [row_end[r - 1], row_end[r]) of the list
  std::vector<float> wt_rows, g_rows, param_rows;  // [n, kp]
  // Per row, the columns of the entries whose soft weight changed in this iteration and
  // their changes (in order of column), and how many.
  std::vector<int32_t> changed;
  std::vector<float> change;
  std::vector<int64_t> count;
  // compact()'s scratch: per 16-entry chunk of the list, which entries stay and how many
  // stay before it
  std::vector<uint32_t> keep;
  std::vector<int64_t> kept_before;
  // pos, delta, changed and change have a vector more: list_changes reads and writes whole
  // vectors from any entry on
  explicit BlockState(int n, int64_t kp)
      : active(n * kp), identity(true), pos(n * kp + kPad, 0), param(n * kp, 0.f), m(n * kp, 0.f),
        v(n * kp, 0.f), base(n * kp, 0.f), scale(n * kp, 0.f), t(n * kp, 0.f), wt(n * kp, 0.f),
        delta(n * kp + kPad, 0.f), dq(n * kp, 0.f), h(n * kp, 0.f), g(n * kp, 0.f), row_end(n),
        wt_rows(n * kp, 0.f), g_rows(n * kp, 0.f), param_rows(n * kp, 0.f), changed(n * kp + kPad, 0),
        change(n * kp + kPad, 0.f), count(n, 0), keep(n * kp / kPad, 0), kept_before(n * kp / kPad + 1, 0) {
    for (int64_t i = 0; i < n * kp; ++i) pos[i] = int32_t(i);
    for (int r = 0; r < n; ++r) row_end[r] = (r + 1) * kp;
  }

  // The list's length rounded up to whole vectors: what the element-wise loops run over.
  int64_t size() const { return (active + kPad - 1) / kPad * kPad; }

  // The soft weights in row-major order, for a full product.
  const float* product_input() {
    if (identity) return wt.data();
    for (int64_t i = 0; i < active; ++i) wt_rows[pos[i]] = wt[i];
    return wt_rows.data();
  }

  // The active entries' products w~ A, packed, for the gradient.
  template <Isa L>
  PYQUANT_INLINE const float* gradient_products() {
    if (identity) return g_rows.data();
    int64_t i = 0;
    for (; i + kPad <= active; i += kPad) store16<L>(g.data() + i, gather16<L>(g_rows.data(), load16(pos.data() + i)));
    for (; i < active; ++i) g[i] = g_rows[pos[i]];
    return g.data();
  }

  // Drops the frozen entries from the list, keeping their last soft weight and V in the
  // row-major copies. Between the soft weights and Adam's step: a dropped entry's change in
  // this iteration is already in the products, and its step would not change its rounding.
  // Without a branch per entry (which entries froze is unpredictable): every entry's soft
  // weight and V are written to the row-major copies (a kept entry's are written again
  // before they are read), then each array keeps its entries 16 at a time (compress16), in
  // place: chunk c's are stored from kept_before[c] <= 16 c on, after chunk c is read.
  template <Isa L>
  PYQUANT_INLINE void compact(int n) {
    if (identity) {
      std::copy(wt.begin(), wt.end(), wt_rows.begin());
      std::copy(param.begin(), param.end(), param_rows.begin());
      identity = false;
    } else {
      for (int64_t i = 0; i < active; ++i) {
        wt_rows[pos[i]] = wt[i];
        param_rows[pos[i]] = param[i];
      }
    }
    const int64_t chunks = size() / kPad;
    int64_t kept = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      uint32_t stays = ~frozen_mask16<L>(load16(param.data() + c * kPad), load16(m.data() + c * kPad)) & 0xffffu;
      if (active - c * kPad < kPad) stays &= (1u << (active - c * kPad)) - 1;  // the padding goes
      keep[c] = stays;
      kept_before[c] = kept;
      kept += __builtin_popcount(stays);
    }
    kept_before[chunks] = kept;
    for (int r = 0; r < n; ++r) {
      const int64_t c = row_end[r] / kPad, lanes = row_end[r] % kPad;
      row_end[r] = kept_before[c] + (lanes ? __builtin_popcount(keep[c] & ((1u << lanes) - 1)) : 0);
    }
    for (int64_t c = 0; c < chunks; ++c)
      store16<L>(pos.data() + kept_before[c], compress16<L>(load16(pos.data() + c * kPad), keep[c]));
    for (std::vector<float>* a : {&param, &m, &v, &base, &scale, &t, &wt, &dq, &h}) {
      float* x = a->data();
      for (int64_t c = 0; c < chunks; ++c) store16<L>(x + kept_before[c], compress16<L>(load16(x + c * kPad), keep[c]));
    }
    active = kept;
    for (int64_t j = kept; j < size(); ++j) {  // neutral padding: w~ = 0 * q, dq = 0
      param[j] = kPaddingParam;
      m[j] = v[j] = base[j] = scale[j] = t[j] = wt[j] = dq[j] = h[j] = g[j] = 0.0f;
    }
  }

  // V in row-major order, at the end.
  const float* final_params() {
    if (identity) return param.data();
    for (int64_t i = 0; i < active; ++i) param_rows[pos[i]] = param[i];
    return param_rows.data();
  }
};

// AdaRound's soft weights w~ = s (floor(w/s) + h(V)) of size entries (a multiple of 16),
// dq = dq/dV (zero where h is clamped to [0, 1] or q to [qmin, qmax]: no gradient through a
// clamp), and the change of w~ since the last iteration; returns how many entries changed,
// and sets frozen to how many are frozen (frozen_mask16(), with m Adam's momentum).
// A vector whose |V| are all beyond kSaturatedParam takes h = 0 or 1 and dq = 0 directly:
// the bits the sigmoid would give.
template <Isa L>
PYQUANT_INLINE int64_t soft_weights_adaround(const float* __restrict p, const float* __restrict base,
                                             const float* __restrict scale, float* __restrict h,
                                             float* __restrict dq, float* __restrict wt, float* __restrict delta,
                                             int64_t size, float lo, float hi, const float* __restrict m,
                                             int64_t& frozen) {
  const Floats16 zero = {}, one = splat<L>(1.0f), low = splat<L>(lo), high = splat<L>(hi);
  int64_t changes = 0;
  frozen = 0;
  for (int64_t j = 0; j < size; j += kPad) {
    const Floats16 v = load16(p + j);
    frozen += __builtin_popcount(frozen_mask16<L>(v, load16(m + j)));
    Floats16 hv = select_less<L>(zero, v, one, zero), dv = zero;
    if (any_less16<L>(abs16(v), splat<L>(kSaturatedParam))) {
      const Floats16 sig = one / (one + fast_exp16<L>(-v));
      const Floats16 h_raw = fma16<L>(sig, splat<L>(kZeta - kGamma), splat<L>(kGamma));
      hv = min16<L>(one, max16<L>(zero, h_raw));
      dv = select_less<L>(h_raw, one, sig * (one - sig) * splat<L>(kZeta - kGamma), zero);
      dv = select_less<L>(zero, h_raw, dv, zero);
    }
    const Floats16 q = load16(base + j) + hv;
    const Floats16 w = load16(scale + j) * min16<L>(high, max16<L>(low, q));
    const Floats16 change = w - load16(wt + j);
    store16<L>(h + j, hv);
    dv = select_less<L>(high, q, zero, dv);
    store16<L>(dq + j, select_less<L>(q, low, zero, dv));
    store16<L>(wt + j, w);
    store16<L>(delta + j, change);
    changes += count_nonzero16<L>(change);
  }
  return changes;
}

// AdaQuant's fake-quantized weights w~ = s clamp(round(u/s)), dq = 1/s (straight-through:
// d round(u/s) / du taken as 1/s; zero where q is clamped), and the change of w~, as above.
PYQUANT_INLINE int64_t soft_weights_adaquant(const float* __restrict p, const float* __restrict scale,
                                             float* __restrict dq, float* __restrict wt, float* __restrict delta,
                                             int64_t size, float lo, float hi) {
  int32_t changes = 0;
  for (int64_t j = 0; j < size; ++j) {
    const float s = scale[j];
    const float q = std::nearbyint(p[j] / s);
    const float w = s * std::min(hi, std::max(lo, q));
    const float change = w - wt[j];
    dq[j] = (q < lo || q > hi) ? 0.0f : 1.0f / s;
    wt[j] = w;
    delta[j] = change;
    changes += change != 0.0f;
  }
  return changes;
}

// The regulariser's settings for one iteration: reg_param * d(1 - |2h - 1|^beta)/dh.
struct Regulariser {
  bool on;
  float scale, exponent, pow_at_zero;
};

// The gradient and Adam step of size entries (a multiple of 16):
// d loss / d param = 2 (w~ A - t) s dq [+ reg_param d(1 - |2h - 1|^beta)/dh dq].
// The regulariser's term is computed only for vectors with a nonzero dq (dq >= 0).
template <Isa L, bool kRegulariser>
PYQUANT_INLINE void adam(const float* __restrict g, const float* __restrict t, const float* __restrict dq,
                         const float* __restrict h, const float* __restrict scale, float* __restrict p,
                         float* __restrict m, float* __restrict v, int64_t size, const Regulariser reg, float lr_t,
                         float eps_t) {
  const Floats16 zero = {}, one = splat<L>(1.0f), two = splat<L>(2.0f);
  for (int64_t j = 0; j < size; j += kPad) {
    const Floats16 dqj = load16(dq + j);
    Floats16 d = two * (load16(g + j) - load16(t + j)) * load16(scale + j) * dqj;
    if (kRegulariser && any_less16<L>(zero, dqj)) {
      const Floats16 u = two * load16(h + j) - one, au = abs16(u);
      const Floats16 pw = fast_exp16<L>(splat<L>(reg.exponent) * fast_log16<L>(au));
      const Floats16 pj = select_less<L>(zero, au, pw, splat<L>(reg.pow_at_zero));
      const Floats16 term = splat<L>(reg.scale) * pj * select_less<L>(zero, u, two, -two) * dqj;
      d = select_less<L>(zero, dqj, d - term, d);  // where dq != 0
    }
    const Floats16 mj = fma16<L>(splat<L>(kBeta1), load16(m + j), splat<L>(1.0f - kBeta1) * d);
    const Floats16 vj = fma16<L>(splat<L>(kBeta2), load16(v + j), splat<L>(1.0f - kBeta2) * d * d);
    store16<L>(m + j, mj);
    store16<L>(v + j, vj);
    store16<L>(p + j, fma16<L>(splat<L>(-lr_t), mj / (sqrt16<L>(vj) + splat<L>(eps_t)), load16(p + j)));
  }
}

// The list of each row's changed entries, their changes and their count, for update_block,
// from the packed changes, 16 at a time (compress16).
template <Isa L>
PYQUANT_INLINE void list_changes(BlockState& st, int n, int64_t kp) {
  const float* delta = st.delta.data();
  int64_t begin = 0;
  for (int r = 0; r < n; ++r) {
    int32_t* cr = st.changed.data() + r * kp;
    float* vr = st.change.data() + r * kp;
    const Ints16 row_start = Ints16{} + int32_t(r * kp);
    const int64_t end = st.row_end[r];
    int64_t c = 0;
    for (int64_t i = begin; i < end; i += kPad) {
      const Floats16 d = load16(delta + i);
      uint32_t changed = nonzero_mask16<L>(d);
      if (end - i < kPad) changed &= (1u << (end - i)) - 1;  // the next row's entries
      if (!changed) continue;
      store16<L>(cr + c, compress16<L>(load16(st.pos.data() + i) - row_start, changed));
      store16<L>(vr + c, compress16<L>(d, changed));
      c += __builtin_popcount(changed);
    }
    st.count[r] = c;
    begin = end;
  }
}

template <Isa L>
PYQUANT_INLINE void fit_block_body(const Block& b, int qmin, int qmax, const RoundingOptions& o,
                                   const Schedule& sc) {
  const int64_t kp = b.kp, k = b.k;
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
  // Frozen entries leave the list unless the caller reads V, which their skipped steps
  // would no longer move (their roundings are the same either way).
  const bool drop_frozen = adaround && b.param_out == nullptr;
  const float lo = float(qmin), hi = float(qmax);
  int updates_since_full = -1;  // < 0: g holds no product yet
  for (int64_t it = 0; it < o.iterations; ++it) {
    int64_t frozen = 0;  // in the list and its padding
    const int64_t total =
        adaround ? soft_weights_adaround<L>(st.param.data(), st.base.data(), st.scale.data(), st.h.data(),
                                            st.dq.data(), st.wt.data(), st.delta.data(), st.size(), lo, hi,
                                            st.m.data(), frozen)
                 : soft_weights_adaquant(st.param.data(), st.scale.data(), st.dq.data(), st.wt.data(),
                                         st.delta.data(), st.size(), lo, hi);
    // g = w~ A. Saturated entries (h clamped to 0 or 1, q unchanged) keep their w~, so
    // after the first product only the changed entries' rows of A are added in; a full
    // product replaces the running sums when most entries changed, or after
    // kFullProductEvery updates (their rounding errors add up).
    if (updates_since_full < 0 || (total > 0 && (updates_since_full >= kFullProductEvery ||
                                                 double(total) > kFullProductFraction * double(b.n * k)))) {
      block_product<L>(b, st.product_input(), st.g_rows.data());
      updates_since_full = 0;
    } else if (total > 0) {
      list_changes<L>(st, b.n, kp);
      update_block<L>(st.change.data(), st.changed.data(), st.count.data(), b.n, b.gram, kp, st.g_rows.data());
      ++updates_since_full;
    }
    const int64_t frozen_listed = frozen - (st.size() - st.active);  // the padding is frozen
    if (drop_frozen && frozen_listed > 0 && frozen_listed * kCompactFraction >= st.active) {
      st.compact<L>(b.n);
    }
    const float beta = sc.beta[it];
    const Regulariser reg{adaround && it >= sc.warm, o.reg_param * beta, beta - 1.0f,
                          beta > 1.0f ? 0.0f : (beta == 1.0f ? 1.0f : INFINITY)};  // powf(0, beta - 1)
    const float* g = st.gradient_products<L>();
    if (reg.on)
      adam<L, true>(g, st.t.data(), st.dq.data(), st.h.data(), st.scale.data(), st.param.data(), st.m.data(),
                    st.v.data(), st.size(), reg, sc.lr[it], sc.eps[it]);
    else
      adam<L, false>(g, st.t.data(), st.dq.data(), st.h.data(), st.scale.data(), st.param.data(), st.m.data(),
                     st.v.data(), st.size(), reg, sc.lr[it], sc.eps[it]);
  }
  const float* param = st.final_params();  // [n, kp]
  if (b.param_out)
    for (int r = 0; r < b.n; ++r) std::copy(param + r * kp, param + r * kp + k, b.param_out + r * k);
  // Hard rounding, and the nearest-rounding start for the keep_best guard.
  std::vector<float>& hard = st.wt_rows;
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
      const float q = adaround ? std::floor(w / s) + (param[i] >= 0.0f ? 1.0f : 0.0f) : std::nearbyint(param[i] / s);
      hard[i] = s * std::min(hi, std::max(lo, q));
      nearest[i] = s * std::min(hi, std::max(lo, std::nearbyint(w / s)));
    }
  }
  block_product<L>(b, hard.data(), st.g_rows.data());
  block_product<L>(b, nearest.data(), g_nearest.data());
  for (int r = 0; r < b.n; ++r) {
    const float* chosen = hard.data() + r * kp;
    const float* t = b.target + r * k;
    if (o.keep_best) {
      const double learned = row_error(hard.data() + r * kp, st.g_rows.data() + r * kp, t, k);
      const double start = row_error(nearest.data() + r * kp, g_nearest.data() + r * kp, t, k);
      if (!(learned < start)) chosen = nearest.data() + r * kp;
    }
    for (int64_t j = 0; j < k; ++j) b.out[r * k + j] = int8_t(std::nearbyint(chosen[j] / b.scale[r]));
  }
}

PYQUANT_LEVEL_CLONES(void, fit_block, (const Block& b, int qmin, int qmax, const RoundingOptions& o, const Schedule& sc),
               (b, qmin, qmax, o, sc))

template <Isa L>
PYQUANT_INLINE void gram_rows_body(const float* x, const float* a, int n, int64_t kp, float* out) {
  product_block<L>(x, a, n, kp, out);
}

PYQUANT_LEVEL_CLONES(void, gram_rows, (const float* x, const float* a, int n, int64_t kp, float* out), (x, a, n, kp, out))

void gram_product_impl(const float* x, const float* a, int64_t rows, int64_t kp, float* out) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_for(rows * kp * kp, kGramProductMinParallel))
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int n = int(std::min<int64_t>(kRowBlock, rows - r0));
    gram_rows(x + r0 * kp, a, n, kp, out + r0 * kp);
  }
}

template <Isa L>
PYQUANT_INLINE void update_rows_body(const float* change, const int32_t* changed, const int64_t* count, int n,
                                     const float* a, int64_t kp, float* g) {
  const float* grams[kRowBlock];
  std::fill(grams, grams + kRowBlock, a);
  update_block<L>(change, changed, count, n, grams, kp, g);
}

PYQUANT_LEVEL_CLONES(void, update_rows, (const float* change, const int32_t* changed, const int64_t* count, int n,
                                   const float* a, int64_t kp, float* g),
               (change, changed, count, n, a, kp, g))

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
  std::vector<float> change(rows * kp, 0.f), gp(rows * kp, 0.f);
  std::vector<int32_t> changed(rows * kp, 0);
  std::vector<int64_t> count(rows, 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < k; ++j) {
      const float delta = x[r * k + j] - x_prev[r * k + j];
      if (delta != 0.0f) {
        changed[r * kp + count[r]] = int32_t(j);
        change[r * kp + count[r]++] = delta;
      }
    }
    std::copy(g + r * k, g + (r + 1) * k, gp.begin() + r * kp);
  }
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int n = int(std::min<int64_t>(kRowBlock, rows - r0));
    update_rows(change.data() + r0 * kp, changed.data() + r0 * kp, count.data() + r0, n, a.data(), kp,
                gp.data() + r0 * kp);
  }
  for (int64_t r = 0; r < rows; ++r) std::copy(gp.begin() + r * kp, gp.begin() + r * kp + k, g + r * k);
}

}  // namespace pyquant
