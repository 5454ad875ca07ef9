// Function multiversioning: one copy of a hot function per x86-64 level, chosen when the
// module loads, so that a portable build still uses AVX2/AVX-512 where the CPU has them.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PYQUANT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYQUANT_MULTIVERSION
#endif
#define PYQUANT_INLINE inline __attribute__((always_inline))
