#include "kernels/parallel.h"

#include <atomic>
#include <thread>

#if defined(__linux__)
#include <sched.h>
#endif

namespace pyquant {
namespace {

int affinity_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

std::atomic<int> g_num_threads{affinity_cpus()};
std::atomic<bool> g_thresholds{true};

}  // namespace

int num_threads() { return g_num_threads.load(std::memory_order_relaxed); }

void set_num_threads(int n) { g_num_threads.store(n < 1 ? 1 : n, std::memory_order_relaxed); }

int threads_for(int64_t work, int64_t min_work) {
  if (g_thresholds.load(std::memory_order_relaxed) && work < min_work) return 1;
  return num_threads();
}

void set_parallel_thresholds(bool enabled) { g_thresholds.store(enabled, std::memory_order_relaxed); }

bool parallel_thresholds() { return g_thresholds.load(std::memory_order_relaxed); }

}  // namespace pyquant
