// The kernels' share of the process's thread budget.
//
// Every OpenMP region of the kernels runs with num_threads(threads_for(work, min_work)):
// the process-wide count set by set_num_threads (pyquant.kernels.set_num_threads), or one
// thread when the region's work is below its kernel's threshold, where waking a second
// thread costs more than it saves. The thresholds are constants next to each kernel,
// measured by benchmarks/kernel_threads.py.
#pragma once
#include <cstdint>

namespace pyquant {

// Threads a parallel region may use (>= 1). Default: the CPUs in the process's affinity
// mask when the module loads (what taskset, a container or a batch scheduler grants).
int num_threads();
// Preconditions: n >= 1. Process-wide: applies to every kernel call that starts after it.
void set_num_threads(int n);

// Threads for a region of `work` units: 1 when work < min_work, else num_threads().
int threads_for(int64_t work, int64_t min_work);

// For benchmarks/kernel_threads.py only: with false, threads_for ignores min_work (so that
// small inputs can be timed on several threads).
void set_parallel_thresholds(bool enabled);
bool parallel_thresholds();

}  // namespace pyquant
