// Function multiversioning: one copy of a hot function per x86-64 level (x86-64-v4 with
// AVX-512, x86-64-v3 with AVX2 and FMA, and the baseline), and a dispatcher that calls the
// copy of the active level. The active level is the best one the CPU supports, chosen when
// the module loads, and can be lowered (or raised back) for testing: set_active_isa, bound
// as pyquant.kernels.set_isa and read from PYQUANT_ISA at import.
//
// A copy is its function's body (a PYQUANT_INLINE function NAME_body) inlined into a
// function compiled for the level, so every call it inlines uses the level's instructions.
// The body must not contain an OpenMP region (GCC outlines a region before inlining, so it
// would run baseline code): parallel loops call the dispatcher of their per-thread work.
// The whole module is compiled with -ffp-contract=off: no level fuses a multiply and an add
// that the source keeps apart, so results do not depend on the level wherever the order of
// the operations is fixed by the source (see the README).
#pragma once

namespace pyquant {

enum class Isa : int { Baseline = 0, Avx2 = 1, Avx512 = 2 };

// "baseline", "avx2", "avx512".
const char* isa_name(Isa isa);
// Whether this CPU (and its OS, which must save the vector registers) runs the level's copies.
bool isa_supported(Isa isa);
// The best supported level: what the module starts with.
Isa best_isa();
// The level whose copies the dispatchers call.
Isa active_isa();
// Preconditions: isa_supported(isa). Process-wide; applies to calls that start after it.
void set_active_isa(Isa isa);

}  // namespace pyquant

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PYQUANT_X86_LEVELS 1
#define PYQUANT_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define PYQUANT_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define PYQUANT_X86_LEVELS 0
#define PYQUANT_TARGET_AVX512
#define PYQUANT_TARGET_AVX2
#endif
#define PYQUANT_INLINE inline __attribute__((always_inline))

// Defines NAME_avx512, NAME_avx2 and NAME_baseline (NAME_body compiled for each level) and
// NAME, which calls the copy of the active level. PARAMS is the parenthesised parameter
// list, ARGS the parenthesised argument names. Overloads (float and double) may share a NAME.
#define PYQUANT_CLONES(RET, NAME, PARAMS, ARGS)                               \
  PYQUANT_TARGET_AVX512 RET NAME##_avx512 PARAMS { return NAME##_body ARGS; } \
  PYQUANT_TARGET_AVX2 RET NAME##_avx2 PARAMS { return NAME##_body ARGS; }     \
  RET NAME##_baseline PARAMS { return NAME##_body ARGS; }                     \
  PYQUANT_DISPATCH(RET, NAME, PARAMS, ARGS)
// PYQUANT_CLONES for a body templated on the level (template <Isa L> NAME_body), for code
// that calls a level's builtins itself (csrc/kernels/rounding.cc).
#define PYQUANT_LEVEL_CLONES(RET, NAME, PARAMS, ARGS)                                               \
  PYQUANT_TARGET_AVX512 RET NAME##_avx512 PARAMS { return NAME##_body<::pyquant::Isa::Avx512> ARGS; } \
  PYQUANT_TARGET_AVX2 RET NAME##_avx2 PARAMS { return NAME##_body<::pyquant::Isa::Avx2> ARGS; }       \
  RET NAME##_baseline PARAMS { return NAME##_body<::pyquant::Isa::Baseline> ARGS; }                   \
  PYQUANT_DISPATCH(RET, NAME, PARAMS, ARGS)
// NAME, which calls NAME_avx512, NAME_avx2 or NAME_baseline by the active level (for copies
// written by hand, e.g. with a level's intrinsics: csrc/kernels/histogram.cc).
#define PYQUANT_DISPATCH(RET, NAME, PARAMS, ARGS)               \
  RET NAME PARAMS {                                             \
    switch (::pyquant::active_isa()) {                          \
      case ::pyquant::Isa::Avx512: return NAME##_avx512 ARGS;   \
      case ::pyquant::Isa::Avx2: return NAME##_avx2 ARGS;       \
      default: return NAME##_baseline ARGS;                     \
    }                                                           \
  }
