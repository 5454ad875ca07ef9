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
    stay within about 1.5x the budget at their peak;
  * numpy's BLAS (OpenBLAS in numpy's wheels) runs on one thread inside a run: its worker
    threads spin while they wait, and beside two CPU hogs the pointwise Gram products of
    fast finetune took 3.2-3.5 s wall with 2 threads against 0.43-0.53 s with one (same
    bits: OpenBLAS splits a product by output blocks, not along the sum). The callers that
    have independent products run them in ``kernels`` Python threads instead.
"""
from __future__ import annotations

import contextlib
import ctypes
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


def _openblas_controls() -> Optional[tuple]:
    """(get, set) of the thread count of the OpenBLAS loaded in this process (numpy's), or
    None (another BLAS, or a platform without /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"), ("openblas", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                return get, put
    return None


_BLAS = _openblas_controls()


def set_blas_threads(n: int) -> Optional[int]:
    """Set numpy's BLAS thread count; returns the previous one (None: not controllable)."""
    if _BLAS is None:
        return None
    previous = int(_BLAS[0]())
    _BLAS[1](int(n))
    return previous


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
        previous_blas = set_blas_threads(1)
    try:
        yield chosen
    finally:
        with _lock:
            _active = previous
            kernels.set_num_threads(previous_kernels)
            if previous_blas is not None:
                set_blas_threads(previous_blas)
