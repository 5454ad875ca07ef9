"""The kernels' thread control: set_num_threads/get_num_threads, the default from the
affinity mask, and OpenMP's passive waiting."""
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from pyquant import _kernels, kernels

needs_affinity = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no affinity masks here")


def run_python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    full_env.update(env)
    # cwd: not the checkout, whose pyquant/ (without the built extension) would shadow the installed one
    done = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120,
                          cwd=tempfile.gettempdir())
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def restore_threads():
    before = kernels.get_num_threads()
    yield
    kernels.set_num_threads(before)


@needs_affinity
def test_default_is_the_affinity_mask_at_import():
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from pyquant import kernels; print(kernels.get_num_threads())")
    assert run_python(code).stdout.split() == ["1"]
    code = "import os; from pyquant import kernels; print(kernels.get_num_threads(), len(os.sched_getaffinity(0)))"
    got, cpus = run_python(code).stdout.split()
    assert got == cpus


def test_set_num_threads_round_trips_and_rejects_nonsense(restore_threads):
    kernels.set_num_threads(1)
    assert kernels.get_num_threads() == 1
    kernels.set_num_threads(np.int64(3))
    assert kernels.get_num_threads() == 3
    for bad in (0, -2, 1.5, True, "2", kernels.MAX_THREADS + 1):
        with pytest.raises(ValueError, match=r"set_num_threads: n must be an integer in \[1, 1024\]"):
            kernels.set_num_threads(bad)
    with pytest.raises(ValueError, match="at least 1"):
        _kernels.set_num_threads(0)
    assert kernels.get_num_threads() == 3


def test_openmp_waits_passively_unless_the_user_says_otherwise():
    """libgomp prints its settings at load with OMP_DISPLAY_ENV: importing pyquant.kernels
    must have set OMP_WAIT_POLICY before the extension (and libgomp) loaded."""
    code = "from pyquant import kernels; kernels.range_stats(kernels.np.ones(10**6, 'float32'))"
    shown = run_python(code, OMP_DISPLAY_ENV="VERBOSE").stderr
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in shown
    assert "GOMP_SPINCOUNT = '0'" in shown
    shown = run_python(code, OMP_DISPLAY_ENV="VERBOSE", OMP_WAIT_POLICY="ACTIVE").stderr
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in shown


def test_small_regions_run_on_one_thread(restore_threads):
    thresholds = _kernels._parallel_thresholds()
    kernels.set_num_threads(2)
    try:
        assert _kernels._threads_for(99_999, 100_000) == 1
        assert _kernels._threads_for(100_000, 100_000) == 2
        _kernels._set_parallel_thresholds(False)  # benchmarks/kernel_threads.py times small inputs on 2 threads
        assert _kernels._threads_for(1, 100_000) == 2
    finally:
        _kernels._set_parallel_thresholds(thresholds)
    kernels.set_num_threads(1)
    assert _kernels._threads_for(10 ** 9, 100_000) == 1


def test_kernels_give_the_same_results_below_and_above_their_thresholds(restore_threads):
    """Thresholds change the threads, never the results (the order of every sum is fixed)."""
    x = np.random.default_rng(5).standard_normal(200_003).astype(np.float32)
    kernels.set_num_threads(2)
    results = []
    for thresholds in (True, False):
        _kernels._set_parallel_thresholds(thresholds)
        try:
            hist = np.zeros(64)
            kernels.histogram_accumulate(x, hist, -5, 5)
            sums = np.zeros(7)
            kernels.channel_sums(x[:199_997].reshape(1, 7, -1), sums)
            results.append((hist, sums, kernels.range_stats(x).max))
        finally:
            _kernels._set_parallel_thresholds(True)
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2]
