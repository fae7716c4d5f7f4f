"""Shared numba settings for the kernels.

FASTMATH lets numba reorder sums and fuse multiply-adds so loops vectorise, but keeps IEEE
semantics for inf and nan ('nnan'/'ninf' are left out): the kernels bound their loops to the
causal range instead of writing -inf, and a NaN loss must still be seen as NaN.

Every parallel kernel is compiled twice: `f` runs its prange loops on numba's threads, `f.serial`
runs them on the calling thread. Waking threads costs tens of microseconds, more than a small
array's whole work, so the ops call `pick(f, work)` to choose by size.
"""
import types

import numba

from numgpt import _threads

FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
# error_model="numpy": a division by zero gives inf or nan, as in NumPy, instead of raising
# ZeroDivisionError. The Python model tests every divisor, and that branch keeps a loop with a
# division in it from vectorising: AdamW's update ran 4.5x slower (3.2 ms against 0.7 ms for
# 800k parameters on one thread). The kernels' divisors are sums of exponentials, standard
# deviations with eps added, and constants, never zero.
OPTIONS = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
PARALLEL_MIN_WORK = 1 << 17   # elements (or inner-loop iterations) below which threads do not pay


def _renamed(fn, suffix):
    """A copy of fn under another qualified name: numba names its cache files after the function,
    so without this the serial twin would load the parallel build from the cache (and vice versa)."""
    g = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__,
                           fn.__closure__)
    g.__qualname__ = fn.__qualname__ + suffix
    g.__doc__ = fn.__doc__
    return g


def jit(parallel=False):
    def wrap(fn):
        fast = numba.njit(parallel=parallel, **OPTIONS)(fn)
        if parallel:
            fast.serial = numba.njit(**OPTIONS)(_renamed(fn, "_serial"))
        return fast
    return wrap


FORCE_SERIAL = False  # warm-up switch: compile the serial twins even for big work


def threads_allowed():
    """Whether kernels may run on numba's threads now (not forced serial, BLAS not spinning)."""
    return _threads.PARALLEL_KERNELS and FORCE_SERIAL is False


def pick(kernel, work):
    """The parallel kernel for big work, its serial twin for small (or when BLAS threads spin)."""
    if work >= PARALLEL_MIN_WORK and threads_allowed():
        return kernel
    return kernel.serial
