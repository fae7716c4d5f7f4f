"""Shared numba settings for the kernels.

FASTMATH lets numba reorder sums and fuse multiply-adds so loops vectorise, but keeps IEEE
semantics for inf and nan ('nnan'/'ninf' are left out): the kernels bound their loops to the
causal range instead of writing -inf, and a NaN loss must still be seen as NaN.

Every parallel kernel is compiled twice: `f` runs its prange loops on numba's threads, `f.serial`
runs them on the calling thread. Waking threads costs more than a small array's whole work,
so the ops call `pick(f, work)` to choose by size.
"""
import glob
import hashlib
import os
import shutil
import tempfile
import types

import numba

import numgpt
from numgpt import _threads, env, paths

HERE = os.path.dirname(os.path.abspath(__file__))

# the thread pools' short spins, applied when the kernels first load, before numba's OpenMP pool
# first starts (numgpt/_threads.py); malloc is tuned later, when training starts
_threads.short_spins()

FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
# error_model="numpy": a division by zero gives inf or nan, as in NumPy, instead of raising
# ZeroDivisionError. The Python model tests every divisor, and that branch keeps a loop with a
# division in it from vectorising (AdamW's update among them; docs/kernels.md).
# The kernels' divisors are sums of exponentials, standard deviations with eps added, and
# constants, never zero.
OPTIONS = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
PARALLEL_MIN_WORK = 1 << 17   # elements (or inner-loop iterations) below which threads do not pay


# ---- the on-disk cache, keyed by every kernel source and the compile options ----
#
# numba keys a cached function by its own file's contents and its bytecode, not by the compile
# options nor by the files of the functions it calls (whose code is linked into its cache). So
# after an update that changed OPTIONS, or only kernels/activations.py, an old cache would keep
# serving old code (the decoder with an old GELU; kernels with the old error model). The kernels'
# cache therefore lives in a folder named by a hash of all of kernels/*.py, OPTIONS and numba's
# version: any change starts a fresh cache (and the first run says that it compiles).

# numgpt/layers/dropout.py too: kernels/dropout.py compiles its hash constants in (found from
# the numgpt package: installed, these files are numgpt/kernels/, in a clone the top-level kernels/)
NUMGPT_DIR = os.path.dirname(os.path.abspath(numgpt.__file__))
DROPOUT_REFERENCE = os.path.join(NUMGPT_DIR, "layers", "dropout.py")
# numgpt/arch.py too: the kernels compile its constants in (NORM_PRE, ACT_RELU, ...)
ARCH_DESCRIPTION = os.path.join(NUMGPT_DIR, "arch.py")


def _stamp():
    options = {k: sorted(v) if isinstance(v, set) else v for k, v in OPTIONS.items()
               if k != "cache"}  # whether it caches does not change the code
    h = hashlib.sha256(f"{numba.__version__} {sorted(options.items())}".encode())
    sources = [(os.path.basename(p), p) for p in sorted(glob.glob(os.path.join(HERE, "*.py")))]
    for name, path in sources + [("numgpt/layers/dropout.py", DROPOUT_REFERENCE),
                                 ("numgpt/arch.py", ARCH_DESCRIPTION)]:
        with open(path, "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


# in a clone kernels/__pycache__, installed the user's cache, or $NUMBA_CACHE_DIR (numgpt/paths.py)
CACHE_BASE = paths.kernel_cache_base(HERE)
CACHE_DIR = os.path.join(CACHE_BASE, "numba-" + _stamp())
IN_TREE = CACHE_BASE == os.path.join(HERE, "__pycache__")
CACHE_WRITABLE = True  # False: compiled in memory in every process (see the end of this block)


def _forget_old_caches():
    """Remove the in-tree caches of earlier kernel sources (never a user's NUMBA_CACHE_DIR, which
    other checkouts may share)."""
    if not IN_TREE or os.path.isdir(CACHE_DIR):
        return
    for old in glob.glob(os.path.join(CACHE_BASE, "numba-*")):
        shutil.rmtree(old, ignore_errors=True)
    for old in glob.glob(os.path.join(CACHE_BASE, "*.nb[ic]")):  # the layout before the stamp
        try:
            os.remove(old)
        except OSError:
            pass


def _install_locator():
    """Put the kernels' cache in CACHE_DIR; other numba code in the process keeps numba's own."""
    from numba.core import caching

    class KernelCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
        def __init__(self, py_func, py_file):
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno

        def get_cache_path(self):
            return CACHE_DIR

        @classmethod
        def from_function(cls, py_func, py_file):
            path = os.path.abspath(py_file)
            if os.path.dirname(path) != HERE and path != _typed_list_source():
                return None
            return super().from_function(py_func, py_file)  # None if CACHE_DIR is not writable

    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # the name before 0.6x
    if not any(c.__name__ == "KernelCacheLocator" for c in impl._locator_classes):
        impl._locator_classes.insert(0, KernelCacheLocator)


def _typed_list_source():
    from numba.typed import typedlist
    return os.path.abspath(typedlist.__file__)


def _cache_typed_lists():
    """numba compiles the helpers behind numba.typed.List (making one, appending) for every
    element type on first use and keeps them in memory only, so every run that makes typed
    lists (the fused step's parameters and gradients, the one-call AdamW) would compile them
    again before its first step. Cached with the kernels (the locator above), a later run loads
    them."""
    from numba.core.registry import CPUDispatcher
    from numba.typed import typedlist
    for obj in vars(typedlist).values():
        if isinstance(obj, CPUDispatcher) and obj._cache.__class__.__name__ == "NullCache":
            try:
                obj.enable_caching()
            except RuntimeError:  # no writable cache anywhere: they compile in memory, as before
                return


def _writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


# When CACHE_DIR cannot be written, the kernels are not cached at all: numba would otherwise
# fall back to a __pycache__ beside their sources (inside site-packages, when installed) or to
# its own folder, where no hash of the kernel sources guards against stale code.
try:
    _install_locator()
    _forget_old_caches()
    CACHE_WRITABLE = _writable(CACHE_DIR)
    if CACHE_WRITABLE:
        _cache_typed_lists()
    else:
        OPTIONS["cache"] = False
except (ImportError, AttributeError):  # another numba's internals: its own cache, as before
    CACHE_DIR = CACHE_BASE
    if not IN_TREE and not env.path("NUMBA_CACHE_DIR"):
        OPTIONS["cache"] = False  # numba's own would be beside the sources, in site-packages


def _renamed(fn, suffix):
    """A copy of fn under another qualified name: numba names its cache files after the function,
    so without this the serial twin would load the parallel build from the cache (and vice versa)."""
    g = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__,
                           fn.__closure__)
    g.__qualname__ = fn.__qualname__ + suffix
    g.__doc__ = fn.__doc__
    return g


def jit(parallel=False, inline=False):
    """numba.njit with OPTIONS (cached); parallel: also a serial twin as `.serial`; inline: the
    function's body is inlined into its callers when numba compiles them (numba's
    inline="always"), so that composing the fused step from small helpers costs what one
    function did."""
    def wrap(fn):
        fast = numba.njit(parallel=parallel, inline="always" if inline else "never", **OPTIONS)(fn)
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


# ---- Index with loop variables ----
#
# numba accepts negative indices, so every index it cannot prove >= 0 gets a test (add the
# length when negative) at each use. LLVM proves it for a loop variable of range(n) counted from
# 0, not for an expression of one such as h * hs + d when h comes from a division or from an
# argument: then an inner loop pays the test on every element and does not vectorise (e.g. the
# per-row sum D = dy_i . y_i written dy[b, i, h * hs + d]). So inner loops take slices first
# (rows, heads' columns: dyi = dy[b, i, h * hs:(h + 1) * hs]) and index them with the loop
# variable alone (dyi[d]). Measurements: docs/kernels.md, "Index with loop variables".


# ---- exp that vectorises ----

def fast_exp(x):
    """exp(x). In kernels, float32 takes a polynomial that LLVM can vectorise (libm's expf, which
    numba calls one element at a time without Intel's SVML, cannot be; docs/kernels.md); float64
    takes math.exp. Python callers get math.exp."""
    import math
    return math.exp(x)


def _install_fast_exp():
    import math

    import numpy as np
    from numba import types
    from numba.extending import overload

    @overload(fast_exp, jit_options=dict(fastmath=FASTMATH, error_model="numpy"))
    def _fast_exp(x):
        if not (isinstance(x, types.Float) and x.bitwidth == 32):
            return lambda x: math.exp(x)

        def exp32(x):
            # exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, ln 2 split in two parts
            # so that n ln 2 is exact; exp(r) by its degree-7 polynomial (coefficients fitted for
            # float32, as in the Cephes library); 2^n built in the exponent bits. All in float32:
            # relative error at most 3e-7 over [-87, 0] (a few float32 ulps; libm's 6e-8), NaN
            # stays NaN, and the range is clamped to the normal floats: exp(-inf) gives 1.2e-38,
            # not 0, which no softmax sum can see.
            lo = np.float32(-87.33654)
            hi = np.float32(88.0)
            x = lo if x < lo else x      # written so that a NaN passes through
            x = hi if x > hi else x
            n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))  # float32
            r = x - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
            p = np.float32(1.9875691500e-4)
            p = p * r + np.float32(1.3981999507e-3)
            p = p * r + np.float32(8.3334519073e-3)
            p = p * r + np.float32(4.1665795894e-2)
            p = p * r + np.float32(1.6666665459e-1)
            p = p * r + np.float32(5.0000001201e-1)
            y = p * r * r + r + np.float32(1)
            return y * np.int32((np.int64(n) + 127) << 23).view(np.float32)
        return exp32


_install_fast_exp()
