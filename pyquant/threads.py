"""One thread budget for the whole process: onnxruntime, the C++ kernels and the image
decoders share it instead of each sizing itself to the machine.

Why: on a busy machine every component that starts one thread per core multiplies the
load, and threads that spin while they wait (OpenMP's and onnxruntime's defaults) burn the
cores the others need. Measured before this module (issue "solid core"): with two
CPU-bound processes beside it on 2 cores, an XINT8 quantization took 89 s against 9.4 s
quiet, and the threaded histogram of a 175k-element tensor 10.7 ms against 0.2 ms
single-threaded.

The budget (default: the CPUs in this process's affinity mask, which is what a container,
``taskset`` or a batch scheduler grants, not the machine's count):
  * onnxruntime runs with ``intra_op`` = the budget and without spinning;
  * the kernels run with the budget (they run between onnxruntime calls, not beside them),
    small inputs single-threaded (thresholds in csrc/, measured by
    benchmarks/kernel_threads.py), and OpenMP waits passively (pyquant.kernels);
  * image decoding overlaps inference in one prefetch thread, with
    ``max(1, budget // 2)`` decoder threads, so that decoding and inference together
    stay within about 1.5x the budget at their peak.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Iterator, Optional

from . import kernels
from .errors import ConfigError


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class ThreadBudget:
    """How many threads each component may use."""

    total: int

    def __post_init__(self) -> None:
        if isinstance(self.total, bool) or not isinstance(self.total, int) or self.total < 1:
            raise ConfigError(f"threads must be a positive integer, got {self.total!r}")

    @classmethod
    def for_threads(cls, threads: Optional[int] = None) -> "ThreadBudget":
        return cls(available_cpus() if threads is None else threads)

    @property
    def onnxruntime(self) -> int:
        return self.total

    @property
    def kernels(self) -> int:
        return self.total

    @property
    def decoders(self) -> int:
        return max(1, self.total // 2)


_lock = threading.Lock()
_active: Optional[ThreadBudget] = None


def current() -> ThreadBudget:
    """The budget of the run in progress, or the default one outside a run."""
    return _active or ThreadBudget.for_threads()


@contextlib.contextmanager
def budget(threads: Optional[int] = None) -> Iterator[ThreadBudget]:
    """Apply a budget for the duration of a quantization or evaluation run (the kernels'
    thread count, and what new onnxruntime sessions and decoders read); restored after."""
    global _active
    chosen = ThreadBudget.for_threads(threads)
    with _lock:
        previous, previous_kernels = _active, kernels.get_num_threads()
        _active = chosen
        kernels.set_num_threads(chosen.kernels)
    try:
        yield chosen
    finally:
        with _lock:
            _active = previous
            kernels.set_num_threads(previous_kernels)
