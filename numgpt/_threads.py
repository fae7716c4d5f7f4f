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


PARALLEL_KERNELS = apply()
