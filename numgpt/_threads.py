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
    returns whether it took the settings (False where malloc is not glibc's).

    A training step allocates the same large temporaries every time. By default glibc serves
    big ones from fresh pages (mmap) and unmaps them on free, and gives every thread an arena of
    its own whose heaps it shrinks when they empty; either way the next step faults the same
    pages in again. So: one arena for all threads, blocks up to 32 MB (glibc's largest allowed
    threshold) from the heap, no trimming. Measured here, the data-parallel step of the scaled
    preset at batch 8 (two threads): 15-24k page faults and 35-240 ms of system time a step
    before, none after the second step. An earlier version asked for a 1 GB threshold, which
    glibc refuses, so only its trim setting had taken. The resident size stays at its peak,
    which every step reaches anyway.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
        return bool(libc.mallopt(M_ARENA_MAX, 1) and libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
                    and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False


PARALLEL_KERNELS = apply()
# before any thread has made an arena of its own; NUMGPT_NO_MALLOPT=1 leaves malloc alone
MALLOC_TUNED = "NUMGPT_NO_MALLOPT" not in os.environ and keep_freed_memory()
