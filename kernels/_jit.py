"""Shared numba settings for the kernels.

FASTMATH lets numba reorder sums and fuse multiply-adds so loops vectorise, but keeps IEEE
semantics for inf and nan ('nnan'/'ninf' are left out): the kernels bound their loops to the
causal range instead of writing -inf, and a NaN loss must still be seen as NaN.

Every parallel kernel is compiled twice: `f` runs its prange loops on numba's threads, `f.serial`
runs them on the calling thread. Waking threads costs more than a small array's whole work, so
the ops call `pick(f, work)`, which takes the threaded build from an amount of work measured on
this machine (parallel_min_work, cached).

Also here: the kernels' cache folder (one per machine and set of sources), fast_exp (exp for the
softmax loops), and the block of numgpt/arch.py compiled for kernels/step.py and
kernels/decode.py: block_forward and block_backward, always inlined into their callers, which
hand them their pieces as a module object (pieces).
"""
import glob
import hashlib
import os
import shutil
import tempfile
import threading
import types

import numba

import numgpt
from numgpt import _threads, arch, env, paths

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
# numgpt/arch.py too: the kernels compile its block (block_forward, block_backward) and its
# constants (NORM_PRE, ACT_RELU, ...) in; and numgpt/layers/layernorm.py: LayerNorm's EPS
ARCH_DESCRIPTION = os.path.join(NUMGPT_DIR, "arch.py")
LAYERNORM_REFERENCE = os.path.join(NUMGPT_DIR, "layers", "layernorm.py")


def _stamp():
    options = {k: sorted(v) if isinstance(v, set) else v for k, v in OPTIONS.items()
               if k != "cache"}  # whether it caches does not change the code
    h = hashlib.sha256(f"{numba.__version__} {sorted(options.items())}".encode())
    sources = [(os.path.basename(p), p) for p in sorted(glob.glob(os.path.join(HERE, "*.py")))]
    for name, path in sources + [("numgpt/layers/dropout.py", DROPOUT_REFERENCE),
                                 ("numgpt/arch.py", ARCH_DESCRIPTION),
                                 ("numgpt/layers/layernorm.py", LAYERNORM_REFERENCE)]:
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


# numgpt.arch.n_sublayers, for the compiled block below to loop over its sublayers (inlined into
# its callers and cached in theirs; arch.py is part of the cache's stamp)
n_sublayers = numba.njit(inline="always", nogil=True)(arch.n_sublayers)


def _compiled_arch(fn):
    """fn, a function of numgpt/arch.py, compiled to be inlined into the kernels that call it
    (and cached in theirs); its calls to arch's n_sublayers go to the compiled one above."""
    g = dict(fn.__globals__, n_sublayers=n_sublayers)
    return numba.njit(inline="always", nogil=True)(
        types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__))


# the block, as numgpt/arch.py writes it once, for the compiled step and decoder: they call it
# with their own pieces (an arch.BlockForward or BlockBackward of compiled functions, see pieces)
block_forward = _compiled_arch(arch.block_forward)
block_backward = _compiled_arch(arch.block_backward)


def pieces(name, ops):
    """ops, an arch.BlockForward or BlockBackward of jit(inline=True) functions, as a module
    object named name with the same attributes, for compiled code to call block_forward and
    block_backward with. numba inlines a call ops.norm_in(...) only where ops is a module (its
    inliner follows attributes of modules, not of tuples); so the pieces are inlined into the
    block and the block into its caller, one function as if written there. (Called through a
    tuple, each piece would be a call that passes the whole workspace, a reference count for
    each array.)"""
    ns = types.ModuleType(name)
    ns.__dict__.update(ops._asdict())
    return ns


def _renamed(fn, suffix):
    """A copy of fn under another qualified name: numba names its cache files after the function,
    so without this the serial twin would load the parallel build from the cache (and vice
    versa)."""
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


# ---- Serial or threaded: from how much work threads pay, measured ----
#
# Whether waking numba's threads pays for a call depends on its work and on the CPU (how fast its
# threads wake, its caches and memory). So no size fixed here decides: the first call that could
# run threaded measures, on this machine, from how much work on the threaded build of a typical
# kernel (LayerNorm's forward) beats its serial twin, and caches that size for the machine
# (beside the training step's choices, numgpt/parallel.py). A kernel's two builds may round
# differently (LLVM vectorises their loops apart), so the choice is by size, the same for every
# call of a kind, not by timing each call.

FORCE_SERIAL = False   # the data-parallel step's shards, and the warm-up: every kernel serial
FORCE_THREADS = False  # the warm-up and tests: every kernel threaded (where threads may run)
ONE_BLAS_THREAD = False  # the one-BLAS-thread step: stacked products stay whole (kernels/ops._bmm)
PARALLEL_MIN_WORK = None  # elements from which the threaded builds run; None: not measured yet
MIN_WORK_SIZES = [1 << k for k in range(10, 23)]  # the work sizes measured (elements)
MIN_WORK_ROUNDS = 7  # timed calls of each build per size
WON_IN_A_ROW = 2     # sizes the threaded build must win in a row to end the measurement
NEVER = 1 << 62  # PARALLEL_MIN_WORK where threads won at no size
_MEASURE_LOCK = threading.Lock()


def threads_allowed():
    """Whether kernels may run on numba's threads now (not forced serial, BLAS not spinning)."""
    return _threads.PARALLEL_KERNELS and FORCE_SERIAL is False


def pick(kernel, work):
    """kernel (threaded) for work of at least PARALLEL_MIN_WORK elements, else kernel.serial (and
    always where threads may not run)."""
    if not threads_allowed():
        return kernel.serial
    if FORCE_THREADS:
        return kernel
    least = PARALLEL_MIN_WORK if PARALLEL_MIN_WORK is not None else parallel_min_work()
    return kernel if work >= least else kernel.serial


def parallel_min_work():
    """PARALLEL_MIN_WORK: cached for this machine, else measured now (measure_min_work)."""
    global PARALLEL_MIN_WORK
    with _MEASURE_LOCK:
        if PARALLEL_MIN_WORK is None:
            from numgpt import parallel
            names = [str(n) for n in MIN_WORK_SIZES] + ["never"]
            key = parallel.measured_key({"threaded kernels from": "layernorm_fwd"}, names)
            found = parallel.cached_choice(key, names)
            if found is None:
                times = measure_min_work()
                found = min_work_from(times)
                parallel.cache_choice(key, found, {f"{n} {way}": t for n, pair in times.items()
                                                   for way, t in zip(("serial", "threads"), pair)})
            PARALLEL_MIN_WORK = NEVER if found == "never" else int(found)
    return PARALLEL_MIN_WORK


def measure_min_work(clock=None):
    """{size: (serial seconds, threaded seconds)}: a matrix product (BLAS, [size/64, 64] by
    [64, 64]) followed by LayerNorm's forward over its size elements, as in a step, timed in
    turns with each build of the kernel (MIN_WORK_ROUNDS, medians; a small size's timing repeats
    the pair up to 2^16 elements), for MIN_WORK_SIZES in order until the threaded build has won
    at WON_IN_A_ROW sizes in a row. The product is part of what is timed: a threaded kernel also
    costs the product after it (numba's threads keep spinning for a while, on the cores BLAS's
    threads then want), which timing the kernel alone does not show."""
    import math
    import time

    import numpy as np

    from numgpt.parallel import time_in_turns

    from .layernorm import layernorm_fwd
    clock = clock or time.perf_counter
    eps = np.float32(1e-5)
    weight = np.full((64, 64), 1 / 64, dtype=np.float32)
    times = {}
    for size in MIN_WORK_SIZES:
        x = (np.arange(size, dtype=np.float32) % 7).reshape(-1, 64)
        g, b = np.ones(64, np.float32), np.zeros(64, np.float32)
        y, z = np.empty_like(x), np.empty_like(x)
        mean, rstd = np.empty(len(x), np.float32), np.empty(len(x), np.float32)
        ways = {"serial": layernorm_fwd.serial, "threads": layernorm_fwd}
        reps = max(1, (1 << 16) // size)

        def run(way):
            for _ in range(reps):
                np.dot(x, weight, z)
                ways[way](z, g, b, eps, y, mean, rstd)
        for way in ways:  # first calls: threads start, pages fault in
            run(way)
        t = time_in_turns(run, list(ways), math.inf, MIN_WORK_ROUNDS, clock)
        times[size] = tuple(float(np.median(t[w])) / reps for w in ways)
        wins = [threaded < serial for serial, threaded in times.values()]
        if wins[-WON_IN_A_ROW:] == [True] * WON_IN_A_ROW:
            break
    return times


def min_work_from(times):
    """The least size (as a str) from which the threaded build won at every larger measured size
    ({size: (serial, threaded)}), or "never"."""
    found = "never"
    for size in sorted(times, reverse=True):
        serial, threaded = times[size]
        if threaded >= serial:
            break
        found = str(size)
    return found


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
