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
    """Ask glibc to keep freed blocks for reuse instead of returning each large one to the OS.

    A training step allocates the same large temporaries every time; by default glibc serves each
    from fresh pages (mmap) and hands them back on free, so every step pays page faults to touch
    them again (about a tenth of a laptop-sized step here). mallopt changes that at run time.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


PARALLEL_KERNELS = apply()
if "NUMGPT_NO_MALLOPT" not in os.environ:
    keep_freed_memory()
