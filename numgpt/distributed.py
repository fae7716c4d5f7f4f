"""Data-parallel training over MPI, as llm.c does it:

    mpiexec -n 4 python train.py --preset=scaled        (after pip install -e ".[mpi]")

Every rank (process) holds the whole model. At each step all ranks draw the same global batch
from the same generator, in the state a single process would have, and rank r of N computes the
loss and gradients of rows B*r//N .. B*(r+1)//N of it with the usual step (numgpt/parallel.py),
weighted by its share of the rows. One Allreduce sums them, in place, in one contiguous buffer of
every gradient and the loss, so every rank then holds the gradient of the mean loss over the whole
batch, clips it with the global norm and takes the same AdamW step. The dropout masks are the
whole batch's: each rank draws its rows of them (BatchRows, numgpt/layers/dropout.py). So a run
on N ranks is the single-process run with the same seed, to float rounding (the sums go in
another order), and can be resumed on any other number of ranks.

Rank 0 alone reads the data set and the checkpoint and sends them to the others, and alone
writes the checkpoint, the log, the plot and the progress bar.

A World is the process's view of the job: rank, size, is_root, rows, allreduce, any, bcast,
from_root. SINGLE is one process (every call returns at once); MPIWorld is mpi4py's
COMM_WORLD, where every wait is bounded by NUMGPT_MPI_TIMEOUT: a rank that dies or hangs ends the
job with one line instead of leaving the others waiting forever. Objects go from rank 0 to the
others pickled: the ranks of one job trust each other (checkpoints, which may come from
anywhere, are read without pickle: numgpt/checkpoint.py).
"""
import os
import pickle
import sys
import time

import numpy as np

from . import env
from .config import ConfigError
from .layers.dropout import BatchRows

INSTALL = 'pip install "numgpt[mpi]" (in a clone: pip install -e ".[mpi]")'
GRACE_SECONDS = 2.0  # a rank other than 0 with an error waits this long for rank 0 to report it
ABORT_PAUSE_SECONDS = 0.2  # between a rank's last words and MPI_Abort
SPIN_SECONDS = 0.05  # a collective is tested without pause this long, then every millisecond


class World:
    """One process: rank 0 of 1. Every collective returns at once."""

    rank, size = 0, 1
    local_size = machines = 1  # ranks on this machine; machines in the job
    threads = None  # the threads each rank may use (None: as many as the process has)

    @property
    def is_root(self):
        return self.rank == 0

    def rows(self, batch_size, rank=None):
        """(first, end): the rows of a global batch that rank (default: this one) computes."""
        r = self.rank if rank is None else rank
        return batch_size * r // self.size, batch_size * (r + 1) // self.size

    def allreduce(self, buf, what=""):
        """Sum buf (a contiguous NumPy array) over the ranks, in place."""
        return buf

    def any(self, flag, what=""):
        """Whether flag is true on any rank."""
        return bool(flag)

    def bcast(self, obj=None, what=""):
        """Rank 0's obj, on every rank."""
        return obj

    def from_root(self, make, what=""):
        """make() called on rank 0, its result sent to every rank (an error in make ends the
        job from rank 0: numgpt/cli.py)."""
        return make()

    def check_same(self, items):
        """Raise ConfigError where this rank's items (a dict) differ from rank 0's."""

    def describe(self):
        return "one process"


SINGLE = World()


class MPIWorld(World):
    """The job's ranks, through mpi4py's COMM_WORLD. Collectives are non-blocking calls polled
    until done, so that a wait longer than the timeout (seconds) ends the job with one line."""

    def __init__(self, MPI, timeout):
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = timeout
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
        self.local_size = node.Get_size()
        first = np.array([node.Get_rank() == 0], dtype=np.int64)
        node.Free()
        self.machines = int(self.allreduce(first, "the start")[0])
        self.threads = threads_per_rank(self.local_size)

    def _wait(self, request, what):
        """Poll request until it completes, ending the job when that takes longer than the
        timeout. MPICH moves a non-blocking collective on only inside MPI calls, so a rank that
        slept between tests would hold up the others: the first SPIN_SECONDS it tests without
        pause (yielding the core to any other process that wants it), then every millisecond."""
        start = time.monotonic()
        while True:
            try:
                if request.Test():
                    return
            except self.MPI.Exception as e:
                self.fail(f"MPI failed in {what} on rank {self.rank} ({e.Get_error_string()}); "
                          "the job is stopped, the last checkpoint is intact")
            waited = time.monotonic() - start
            if waited > self.timeout:
                self.fail(f"rank {self.rank} waited {waited:.0f} s for the other ranks in {what}: "
                          "one of them died or hangs (NUMGPT_MPI_TIMEOUT="
                          f"{self.timeout:g}); the job is stopped, the last checkpoint is intact")
            if waited < SPIN_SECONDS:
                os.sched_yield()
            else:
                time.sleep(1e-3)

    def allreduce(self, buf, what="an Allreduce"):
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM), what)
        return buf

    def any(self, flag, what="an Allreduce"):
        a = np.array([1 if flag else 0], dtype=np.int64)
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, a, op=self.MPI.MAX), what)
        return bool(a[0])

    def bcast(self, obj=None, what="a broadcast"):
        """Rank 0's obj, pickled, in two broadcasts: its length, then its bytes."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.is_root else b""
        n = np.array([len(data)], dtype=np.int64)
        self._wait(self.comm.Ibcast(n, root=0), what)
        buf = np.frombuffer(bytearray(data), dtype=np.uint8) if self.is_root else \
            np.empty(int(n[0]), dtype=np.uint8)
        self._wait(self.comm.Ibcast(buf, root=0), what)
        return obj if self.is_root else pickle.loads(buf.tobytes())

    def from_root(self, make, what="a broadcast"):
        return self.bcast(make() if self.is_root else None, what)

    def check_same(self, items):
        root = self.bcast(items, "the start")
        for key, mine in items.items():
            theirs = root.get(key)
            if theirs == mine:
                continue
            if isinstance(mine, dict) and isinstance(theirs, dict):  # the fields that differ
                diff = [k for k in mine if mine[k] != theirs.get(k)]
                key = " and ".join(diff)
                mine = ", ".join(repr(mine[k]) for k in diff)
                theirs = ", ".join(repr(theirs.get(k)) for k in diff)
            raise ConfigError(f"rank {self.rank} runs with another {key} than rank 0 ({mine}, "
                              f"not {theirs}); start every rank with the same options and the "
                              "same versions of numgpt, NumPy and numba")

    def describe(self):
        on = "1 machine" if self.machines == 1 else f"{self.machines} machines"
        return f"{self.size} MPI ranks on {on}, {self.threads} thread{'s' * (self.threads > 1)} each"

    def fail(self, message):
        """Say message as an error on stderr and end the whole job (exit status 1)."""
        _close_progress_bars()
        print(f"error: {message}", file=sys.stderr, flush=True)
        self.abort(1)

    def abort(self, code):
        """End every rank of the job now with exit status code. MPI_Abort prints a line of its
        own; it goes to /dev/null, as the job's error has been said already."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        time.sleep(ABORT_PAUSE_SECONDS)  # for the launcher to pass on what was said
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
        except OSError:
            pass
        self.comm.Abort(code)


def _close_progress_bars():
    """End tqdm's bars (the trainer's), so that what is said next is a line of its own."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def threads_per_rank(local_size):
    """The threads each of local_size ranks on this machine may use so that together they never
    exceed its cores: the cores over the ranks (at least 1), or the cores this process is bound to
    when fewer."""
    total = os.cpu_count() or 1
    try:
        mine = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mine = total
    return max(1, min(mine, total // max(1, local_size)))


def limit_threads(n):
    """Hold this process to n threads: NumPy's BLAS now (threadpoolctl), numba's and the BLAS
    libraries loaded later through their variables (set unless the user set fewer), numba's
    now too if it is loaded already."""
    for var in env.THREAD_VARIABLES:
        mine = env.threads(var)
        if mine is None or mine > n:
            os.environ[var] = str(n)
    from ._threads import threadpoolctl
    threadpoolctl().threadpool_limits(limits=n)
    if "numba" in sys.modules:
        import numba
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


_WORLD = None


def get_world():
    """This process's World, made on the first call: MPIWorld when an MPI launcher started it
    as one of several ranks, SINGLE otherwise. Under a launcher without mpi4py, or with
    another MPI's mpiexec than mpi4py's, a ConfigError says what to do (never N copies of one
    run)."""
    global _WORLD
    if _WORLD is None:
        _WORLD = _make_world()
    return _WORLD


def current():
    """The World made so far, or None."""
    return _WORLD


def _make_world():
    launch = env.mpi_launch()
    if launch is None or launch[1] == 1:
        return SINGLE
    rank, size = launch
    timeout = env.seconds("NUMGPT_MPI_TIMEOUT")
    ranks = f"as one of {size} ranks" if size else f"as rank {rank}"
    try:
        from mpi4py import MPI
    except ImportError as e:
        if size is None and rank == 0:
            return SINGLE  # a PMIx launcher that may have started one process only
        if isinstance(e, ModuleNotFoundError) and e.name == "mpi4py":
            raise ConfigError(f"numgpt was started by mpiexec {ranks}, but mpi4py is not "
                              f"installed: {INSTALL}") from None
        raise ConfigError(f"numgpt was started by mpiexec {ranks}, but mpi4py cannot load its "
                          f"MPI library ({e}): {INSTALL}") from None
    if MPI.COMM_WORLD.Get_size() == 1:
        if size is None:
            return SINGLE
        raise ConfigError(f"numgpt was started by mpiexec {ranks}, but mpi4py's MPI sees one "
                          "process: that mpiexec belongs to another MPI than mpi4py's; use the "
                          "mpiexec installed with it (the one in this environment's bin/)")
    world = MPIWorld(MPI, timeout)
    limit_threads(world.threads)
    return world


def end_with_error(line, code):
    """Say line (a one-line error, or None) on stderr once for the whole job, and return code.
    Under MPI the job is then ended with exit status code: rank 0 says it and aborts at once (the
    others may be waiting for it in a collective); another rank first gives rank 0 GRACE_SECONDS
    to do so (ranks mostly meet the same error), then says it with its rank and aborts itself.
    Started by a launcher without an MPIWorld (no mpi4py), only rank 0 says it."""
    w = _WORLD
    if isinstance(w, MPIWorld):
        if not w.is_root:
            time.sleep(GRACE_SECONDS)
            line = line and f"{line} (rank {w.rank})"
        if line:
            print(line, file=sys.stderr, flush=True)
        w.abort(code)
    launch = env.mpi_launch()
    if line and (launch is None or launch[0] == 0):
        print(line, file=sys.stderr)
    return code


# ---- the data-parallel step ----

def shard_config(world, cfg):
    """cfg with rank 0's share of the batch: the config the steps are chosen and warmed up for."""
    first, end = world.rows(cfg.batch_size, rank=0)
    return cfg if world.size == 1 else cfg.replace(batch_size=end - first)


def check_batch(world, batch_size):
    """Every rank needs a row of each batch: refuse a batch smaller than the ranks."""
    if batch_size < world.size:
        raise ConfigError(f"batch_size {batch_size} cannot be split over {world.size} ranks; "
                          f"use --batch_size={world.size} or more, or fewer ranks")


def _listed(views, kernels):
    """views as the gradients dict the steps return: a ListedGrads (one compiled call each for
    clipping and AdamW) with the kernels, a plain dict without."""
    if not kernels:
        return dict(views)
    from numba.typed import List

    from .optim import ListedGrads
    return ListedGrads(views, List([v.reshape(-1) for v in views.values()]))


class DataParallelStep:
    """step(x, y, train, rng) -> (loss, grads) of the whole batch x, y [B, T] (a global batch):
    this rank's rows computed by `step` (one of numgpt/parallel.py's), weighted by their share
    of the batch, summed over the ranks by one Allreduce. grads are views of one buffer,
    overwritten by the next call."""

    def __init__(self, world, step, model):
        self.world, self.step = world, step
        params = model.params
        n = sum(p.size for p in params.values())
        self.buf = np.empty(n + 1, dtype=model.dtype)  # every gradient, then the loss
        views, o = {}, 0
        for name, p in params.items():
            views[name] = self.buf[o:o + p.size].reshape(p.shape)
            o += p.size
        self.grads = _listed(views, model.cfg.kernels)

    def __call__(self, x, y, train=True, rng=None):
        B = x.shape[0]
        first, end = self.world.rows(B)
        rows = None if rng is None else BatchRows(rng, first)
        loss, grads = self.step(x[first:end], y[first:end], train=train, rng=rows)
        w = self.buf.dtype.type((end - first) / B)  # the rank's loss is a mean over its rows
        for name, g in self.grads.items():
            np.multiply(grads[name], w, out=g)
        self.buf[-1] = loss * w
        self.world.allreduce(self.buf, "the gradients' Allreduce")
        return float(self.buf[-1]), self.grads


def train_step(world, model, cfg, prefer=None, say=None):
    """(step, closer, name): numgpt.parallel.step_function's in one process. Under MPI the step
    that rank 0 chooses for its share of the batch (measured with the threads each rank has, or
    cached, or prefer), made on every rank and wrapped in a DataParallelStep."""
    from .parallel import choose_step, make_step, step_function
    if world.size == 1:
        return step_function(model, cfg, prefer=prefer, say=say)
    share = shard_config(world, cfg)
    name = world.from_root(lambda: choose_step(model, share, prefer=prefer, say=say),
                           "the choice of the step")
    step, close = make_step(name, model)
    return DataParallelStep(world, step, model), close, name


def allreduce_bytes(model_or_params):
    """Bytes each rank all-reduces per step: every gradient and the loss, in float32 unless the
    model says otherwise."""
    params = getattr(model_or_params, "params", model_or_params)
    itemsize = next(iter(params.values())).dtype.itemsize
    return (sum(p.size for p in params.values()) + 1) * itemsize
