"""Thread settings that must be in place before NumPy's OpenBLAS and numba's OpenMP start.

numgpt alternates BLAS calls (OpenBLAS's threads) with numba kernels (OpenMP's threads) on the
same cores. Both pools busy-wait after their work by default, so each steals the cores from the
other: on a 2-core machine a laptop-sized step took 5x longer. A short spin for both
(OPENBLAS_THREAD_TIMEOUT=4, i.e. 2^4 cycles, and GOMP_SPINCOUNT) removes the fight. The user's
own settings win; they are only applied when NumPy has not been imported yet. When NumPy was
imported first without them, OpenBLAS's threads keep spinning, so the kernels stay on the calling
thread (PARALLEL_KERNELS = False): slower than they could be, but never the 5x slowdown.
"""
import os
import sys

DEFAULTS = {"OPENBLAS_THREAD_TIMEOUT": "4", "GOMP_SPINCOUNT": "10000"}


def apply():
    """Set the defaults if NumPy is not loaded yet; returns whether numba may use its threads."""
    if "numpy" not in sys.modules:
        for k, v in DEFAULTS.items():
            os.environ.setdefault(k, v)
    return "OPENBLAS_THREAD_TIMEOUT" in os.environ


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel;
    returns whether it took all three settings (False where malloc is not glibc's).

    A training step allocates the same large temporaries every time. By default glibc serves
    big ones from fresh pages (mmap) and unmaps them on free, and gives every thread an arena of
    its own whose heaps it gives back when they empty; either way the next step faults the same
    pages in again. So: blocks up to 1 GB from the heap, no trimming, and one arena for all
    threads. The last was the one that mattered for the data-parallel step (two threads):
    measured here at the scaled preset, batch 8, 15-24k page faults and 35-240 ms of system time
    a step with the first two settings alone, none after the second step with all three.

    The costs: the threads share one malloc lock (numgpt's threads allocate a few hundred arrays
    a step, so it is not contended), and freed memory is not returned to the system until the
    process ends (the resident size stays at the largest it has been: for training, the peak
    every step reaches anyway). NUMGPT_NO_MALLOPT=1 leaves malloc alone.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
        took = [libc.mallopt(M_MMAP_THRESHOLD, 1 << 30), libc.mallopt(M_TRIM_THRESHOLD, 1 << 30),
                libc.mallopt(M_ARENA_MAX, 1)]
        return all(took)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False


def _opted_out():
    from .env import EnvError, switch
    try:
        return switch("NUMGPT_NO_MALLOPT")
    except EnvError:  # unreadable: leave malloc alone; the commands report it (env.check_all)
        return True


PARALLEL_KERNELS = apply()
# before any thread has made an arena of its own
MALLOC_TUNED = not _opted_out() and keep_freed_memory()
