"""Thread and malloc settings for the kernels: the threads' when the kernels first load, malloc's
when training starts, neither on import.

numgpt alternates BLAS calls (OpenBLAS's threads) with numba kernels (OpenMP's threads) on the
same cores. Both pools busy-wait after their work by default, so each steals the cores from the
other, which on a 2-core machine slows a step several-fold (docs/kernels.md). A short spin for
both (OPENBLAS_THREAD_TIMEOUT=4, i.e. 2^4 cycles, and GOMP_SPINCOUNT) removes the fight.

OpenBLAS reads its timeout when it loads, and NumPy loads it on import, so the setting cannot
simply be put in the environment by `import numgpt` (which would be a process-wide side effect of
an import anyway). Instead short_spins(), called when the kernels are first imported (the first
GPT built with kernels, or train.py), puts both settings in the environment (for libraries that
load later) and restarts the thread pool of each OpenBLAS already loaded that was started without
a timeout: it re-reads the environment (openblas_read_env) and stops its threads
(blas_thread_shutdown_, the call OpenBLAS itself makes around fork), and OpenBLAS starts them again,
with the short spin, at its next threaded call. So `import numpy; import numgpt` trains as fast as
train.py. The user's own settings win: a variable already set is left as it is.
"""
import ctypes
import ctypes.util
import os

SHORT_SPINS = {"OPENBLAS_THREAD_TIMEOUT": "4", "GOMP_SPINCOUNT": "10000"}

# Whether the kernels may use numba's threads: false only where an OpenBLAS is loaded whose
# threads keep spinning and could not be restarted (then the kernels stay on the calling thread:
# slower than they could be, but never slowed by the two pools' fight). Set by short_spins().
PARALLEL_KERNELS = True
MALLOC_TUNED = False
_TRAINING = False  # training_starts() was called


def threadpoolctl():
    """The threadpoolctl module, imported without the setting it makes on import: it puts
    KMP_DUPLICATE_LIB_OK=True in the environment (let a second Intel OpenMP runtime load), a
    process-wide choice that is the user's to make, not numgpt's. numgpt imports it only here."""
    import sys
    if "threadpoolctl" not in sys.modules:
        had = "KMP_DUPLICATE_LIB_OK" in os.environ
        import threadpoolctl as module
        if not had:
            os.environ.pop("KMP_DUPLICATE_LIB_OK", None)
        return module
    return sys.modules["threadpoolctl"]


def blas_pools():
    """threadpoolctl's controller of every BLAS loaded in this process (NumPy's and SciPy's
    OpenBLAS): .limit(limits=n), .lib_controllers."""
    return threadpoolctl().ThreadpoolController().select(user_api="blas")


def _openblas_libraries():
    """ctypes handles of every OpenBLAS loaded in this process (NumPy's, SciPy's, a system one)."""
    try:
        controller = threadpoolctl().ThreadpoolController()
    except ImportError:
        return []
    return [c.dynlib for c in controller.lib_controllers if c.internal_api == "openblas"]


def _restart_with_env(lib):
    """Make one OpenBLAS take the timeout now in the environment; returns whether it spins short."""
    try:
        timeout = lib.openblas_thread_timeout
    except AttributeError:  # an OpenBLAS too old to say: assume its own default (long)
        return False
    if timeout() > 0:  # started with a timeout (the user's, or ours)
        return True
    try:
        lib.openblas_read_env()
        lib.blas_thread_shutdown_()
    except AttributeError:
        return False
    return timeout() > 0


def short_spins():
    """Set both pools' spin short where the user has not chosen otherwise; returns (and stores in
    PARALLEL_KERNELS) whether numba's threads may run beside BLAS's."""
    global PARALLEL_KERNELS
    from .env import is_set
    user_set = is_set("OPENBLAS_THREAD_TIMEOUT")
    for k, v in SHORT_SPINS.items():
        if not is_set(k):
            os.environ[k] = v
    ok = True
    if not user_set:
        ok = all(_restart_with_env(lib) for lib in _openblas_libraries())
    PARALLEL_KERNELS = ok
    return ok


def _libc():
    """The C library, for malloc's settings (OSError where there is none to load)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel;
    returns whether it took all three settings (False where malloc is not glibc's, or
    NUMGPT_NO_MALLOPT is on; an EnvError where NUMGPT_NO_MALLOPT is not a switch value). Called
    when training starts (training_starts); importing numgpt, loading the kernels, sampling and
    evaluating do not.

    A training step allocates the same large temporaries every time. By default glibc serves
    big ones from fresh pages (mmap) and unmaps them on free, and gives every thread an arena of
    its own whose heaps it gives back when they empty; either way the next step faults the same
    pages in again. So: blocks up to 1 GB from the heap, no trimming, and one arena for all
    threads (the data-parallel step's threads otherwise fault their pages in at every step).

    The costs: the threads share one malloc lock (numgpt's threads allocate a few hundred arrays
    a step, so it is not contended), and freed memory is not returned to the system until the
    process ends (the resident size stays at the largest it has been: for training, the peak
    every step reaches anyway). That is why it is not done on import. What it saves a step is
    measured in docs/benchmarks.md ("Freed memory kept").
    """
    global MALLOC_TUNED
    if _opted_out():
        return False
    try:
        libc = _libc()
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
        took = [libc.mallopt(M_MMAP_THRESHOLD, 1 << 30), libc.mallopt(M_TRIM_THRESHOLD, 1 << 30),
                libc.mallopt(M_ARENA_MAX, 1)]
        MALLOC_TUNED = all(took)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        MALLOC_TUNED = False
    return MALLOC_TUNED


def give_back_freed_memory():
    """Return the memory malloc holds free to the system (glibc's malloc_trim), once, e.g. after
    the step measurement, whose candidates' heaps the chosen step need not reuse; returns whether
    it could (False off glibc)."""
    try:
        _libc().malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def training_starts():
    """keep_freed_memory(), once a process: called when training starts (the trainer, and the
    first gradients computed with the kernels: GPT.loss_and_grads, the fused step), so that
    sampling and evaluation leave malloc as it was."""
    global _TRAINING
    if not _TRAINING:
        keep_freed_memory()  # (an EnvError for an unreadable NUMGPT_NO_MALLOPT, at every call)
        _TRAINING = True


def _opted_out():
    """NUMGPT_NO_MALLOPT (a value that is not a switch is an EnvError, as for every switch: the
    commands report it before they start, env.check_all)."""
    from .env import switch
    return switch("NUMGPT_NO_MALLOPT")
