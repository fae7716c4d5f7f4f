"""Every environment variable numgpt reads, parsed here with one rule.

Switches take 1/true/yes/on or 0/false/no/off in any case (surrounding spaces ignored); unset or
empty means the default. Any other value is an error (one line naming the variable), never a
silent guess. Paths are used as given; unset or empty means the default.

    NUMGPT_FUSED            switch, default on: the fused training step of small models
    NUMGPT_DATA_PARALLEL    switch, default on: the two-thread step of mid-sized models
    NUMGPT_NO_MEMORY_CHECK  switch, default off: skip the memory check before a run
    NUMGPT_NO_MALLOPT       switch, default off: leave glibc's malloc settings alone
    NUMGPT_TEST_REQUIRE_BUILD  switch, default off, the test suite's (tests/required.py, checked
                            when the suite starts): a missing torch, mpi4py or wheel build
                            fails its tests, not skips them
    NUMGPT_STEP             one of fused_lanes, fused, sharded, one_blas, plain: force that step
    NUMGPT_MPI_TIMEOUT      seconds > 0, default 300: how long a rank waits for the others in a
                            collective (numgpt/distributed.py) before it stops the job
    NUMGPT_DATA_DIR         path: where prepared data sets go (default: numgpt/paths.py)
    NUMGPT_SHAKESPEARE      path: an existing copy of Tiny Shakespeare's input.txt
    NUMBA_CACHE_DIR         path (numba's own): where compiled kernels are cached
    XDG_CACHE_HOME          path (the XDG standard's): the per-user cache of an installed numgpt
    NUMBA_NUM_THREADS, OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS
                            the libraries' own thread counts: numgpt uses no more threads than the
                            smallest of them (threads, thread_cap); a value that is not a whole
                            number >= 1 (OMP_NUM_THREADS: or a list of them, "4,2") stops the
                            commands with a one-line error, and in the Python API is left to its
                            library
    OPENBLAS_THREAD_TIMEOUT, GOMP_SPINCOUNT
                            OpenBLAS's and OpenMP's own: how long their threads spin; numgpt
                            sets them where the user has not (numgpt/_threads.py)

Read, never set by the user: the rank and size an MPI launcher (mpiexec, mpirun, srun) gives each
process it starts (mpi_launch), so that numgpt knows it runs under one even without mpi4py; and
CI, the variable a CI service sets, which the test suite reads (service_flag): true where it
holds a switch's true value, and since its values are the service's, any other value means
unset, not an error.
"""
import os

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")

SWITCHES = {"NUMGPT_FUSED": True, "NUMGPT_DATA_PARALLEL": True,
            "NUMGPT_NO_MEMORY_CHECK": False, "NUMGPT_NO_MALLOPT": False,
            "NUMGPT_TEST_REQUIRE_BUILD": False}
SUITE_SWITCHES = ("NUMGPT_TEST_REQUIRE_BUILD",)  # read by the test suite, not the commands
CHOICES = {"NUMGPT_STEP": ("fused_lanes", "fused", "sharded", "one_blas", "plain")}
SPIN_VARIABLES = ("OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT")
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "MKL_NUM_THREADS")
PATHS = ("NUMGPT_DATA_DIR", "NUMGPT_SHAKESPEARE", "NUMBA_CACHE_DIR", "XDG_CACHE_HOME")
SECONDS = {"NUMGPT_MPI_TIMEOUT": 300.0}
SERVICE_FLAGS = ("CI",)  # set by a CI service (service_flag)
# (rank, size) variables of the MPI launchers: MPICH's and Intel MPI's hydra, Slurm's PMI-2
# (PMI_*), Open MPI (OMPI_COMM_WORLD_*); PMIx launchers set a rank only
LAUNCH_VARIABLES = (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                    ("PMIX_RANK", None))


class EnvError(ValueError):
    """An environment variable holds a value numgpt cannot read; the message is one line."""


def switch(name):
    """The boolean value of the switch `name` (one of SWITCHES), its default when unset or empty."""
    default = SWITCHES[name]
    raw = os.environ.get(name, "")
    v = raw.strip().lower()
    if not v:
        return default
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise EnvError(f"{name}={raw!r} is not a switch value; use 1/true/yes/on or 0/false/no/off")


def service_flag(name):
    """Whether the variable `name` (one of SERVICE_FLAGS, another program's) holds a true value
    (1/true/yes/on in any case); any other value, or none, means false, never an error."""
    assert name in SERVICE_FLAGS, name
    return os.environ.get(name, "").strip().lower() in TRUE


def choice(name):
    """The value of the variable `name` (one of CHOICES), lower case, or None when unset or empty."""
    raw = os.environ.get(name, "")
    v = raw.strip().lower()
    if not v:
        return None
    if v not in CHOICES[name]:
        raise EnvError(f"{name}={raw!r} is not one of {', '.join(CHOICES[name])}")
    return v


def check_all():
    """Raise EnvError for the first variable that holds an unreadable value (the commands call this
    first, so a typo is one line at the start, not a traceback or a silent default later)."""
    for name in SWITCHES:
        if name not in SUITE_SWITCHES:
            switch(name)
    for name in CHOICES:
        choice(name)
    for name in SECONDS:
        seconds(name)
    for name in THREAD_VARIABLES:  # numba's own check of its count is a traceback on import
        raw = os.environ.get(name, "")
        if raw.strip() and threads(name) is None:
            listed = ' (or a list of them, "4,2")' if name == "OMP_NUM_THREADS" else ""
            raise EnvError(f"{name}={raw!r} is not a thread count; use a whole number >= 1"
                           f"{listed}, or unset it")


def seconds(name):
    """The number of seconds in `name` (one of SECONDS): a finite number > 0, its default when
    unset or empty."""
    raw = os.environ.get(name, "")
    if not raw.strip():
        return SECONDS[name]
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not (v > 0 and v < float("inf")):
        raise EnvError(f"{name}={raw!r} is not a number of seconds > 0")
    return v


def mpi_launch():
    """(rank, size) that an MPI launcher gave this process, or None when none started it. size
    is None where the launcher says only the rank (PMIx); a value that is not a whole number
    counts as unset (the launcher's variables, not the user's)."""
    def whole(var):
        v = os.environ.get(var, "").strip() if var else ""
        return int(v) if _whole(v) else None
    for rank_var, size_var in LAUNCH_VARIABLES:
        rank = whole(rank_var)
        if rank is not None:
            return rank, whole(size_var)
    return None


def path(name):
    """The path in `name` (one of PATHS), or None when unset or empty."""
    assert name in PATHS, name
    return os.environ.get(name) or None


def threads(name):
    """The thread count in `name` (one of THREAD_VARIABLES) when it is a whole number >= 1 (for
    OMP_NUM_THREADS, the first of a list such as "4,2": the outermost level's), else None: unset,
    or a value its library reads by its own rule."""
    assert name in THREAD_VARIABLES, name
    v = os.environ.get(name, "").strip()
    if name == "OMP_NUM_THREADS":
        parts = [p.strip() for p in v.split(",")]
        if not all(_whole(p) and int(p) >= 1 for p in parts):
            return None
        v = parts[0]
    return int(v) if _whole(v) and int(v) >= 1 else None


def _whole(v):
    """Whether v is a whole number written in ASCII digits (str.isdigit alone takes '²')."""
    return v.isascii() and v.isdigit()


def thread_cap():
    """The smallest thread count the user set in THREAD_VARIABLES, or None when none is set."""
    counts = [n for n in map(threads, THREAD_VARIABLES) if n is not None]
    return min(counts) if counts else None


def is_set(name):
    """Whether `name` (one of SPIN_VARIABLES, which numgpt sets where the user has not) is set."""
    assert name in SPIN_VARIABLES, name
    return name in os.environ
