#include "kernels/multiversion.h"

#include <atomic>
#include <initializer_list>

namespace pyquant {
namespace {

bool cpu_has(Isa isa) {
  if (isa == Isa::Baseline) return true;
#if PYQUANT_X86_LEVELS
  __builtin_cpu_init();  // also checks that the OS saves the AVX/AVX-512 state (XCR0)
  if (isa == Isa::Avx2) return __builtin_cpu_supports("x86-64-v3");
  if (isa == Isa::Avx512) return __builtin_cpu_supports("x86-64-v4");
#endif
  return false;
}

Isa detect_best() {
  for (Isa isa : {Isa::Avx512, Isa::Avx2})
    if (cpu_has(isa)) return isa;
  return Isa::Baseline;
}

const Isa g_best = detect_best();
std::atomic<int> g_active{static_cast<int>(g_best)};

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "baseline";
  }
}

bool isa_supported(Isa isa) { return static_cast<int>(isa) <= static_cast<int>(g_best); }

Isa best_isa() { return g_best; }

Isa active_isa() { return static_cast<Isa>(g_active.load(std::memory_order_relaxed)); }

void set_active_isa(Isa isa) { g_active.store(static_cast<int>(isa), std::memory_order_relaxed); }

}  // namespace pyquant
