"""Data-parallel training steps on threads: the batch split in halves, one per core.

For mid-sized models the step is a long chain of medium-sized operations; OpenBLAS and the
numba kernels split each of them over the two cores, and the splitting (waking threads, small
pieces, waiting for the slower half) costs a good share of the second core. Measured here on
the layer path (laptop preset, batch 12): 48.6 ms per step that way, 36 ms for half the batch on
one thread. So for such models each core takes half of the batch instead, with single-threaded
BLAS and the kernels' serial builds; each shard weights its gradients by its share of the batch,
and the two are added: 39.9 ms then, 29 ms with the later kernels. Both threads run while
the other is inside BLAS or a kernel, since those release the GIL; the Python between them
does not. So small models without dropout, the laptop preset included, take the fused step of
kernels/step.py instead, whose halves run without Python (FUSED_MAX_WORK), and tiny ones with
dropout stay on the plain path with BLAS on one thread (OneBlasThreadStep).

The result is the gradient of the same mean loss, up to float rounding; dropout masks come from
two generators seeded from the caller's. A run is reproducible from its seed and checkpoint to
float32 rounding, but not always bit for bit: now and then (3 steps in 600 in one test, in the
attention gradients of w_q and w_k) a step comes out one unit in the last place apart when the
two threads compute at once. Where is not found yet: not BLAS, not the attention kernels alone,
not the alignment of inputs, not fresh threads; kernels/ops._chunks no longer depends on the
calling thread, which was one candidate. NUMGPT_DATA_PARALLEL=0 turns sharding off; the plain path is
bit-exact, resume included.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .env import switch

MIN_WORK = 1 << 16  # batch * block * n_embd below which the plain path is faster (tiny models)
# and above which BLAS's and the kernels' own threads do better. Measured: the scaled preset at
# batch 8 (786k) steps in 886 ms sharded against 939 ms not (measured when its dropout masks were
# drawn by NumPy on one core, which sharding spread over both); at batch 64 (6.3M) in 8.37 s
# against 8.0 s.
MAX_WORK = 1 << 21


def cores():
    """The cores this process may use, capped by the usual thread-count variables when set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        v = os.environ.get(var, "")
        if v.isdigit() and int(v) >= 1:
            n = min(n, int(v))
    return n


def worth_sharding(cfg, batch_size=None):
    """Whether a training step of cfg goes faster as this module's layer-by-layer halves on two
    threads (see the module notes); False where the fused step is faster still."""
    B = batch_size or cfg.batch_size
    if not switch("NUMGPT_DATA_PARALLEL"):
        return False
    return (cfg.kernels and cfg.model == "gpt" and B >= 2 and cores() >= 2
            and MIN_WORK <= B * cfg.block_size * cfg.n_embd < MAX_WORK
            and not uses_fused_step(cfg.replace(batch_size=B)))


class ShardedStep:
    """step(x, y, rng) -> (loss, grads) of model.loss_and_grads, computed as `shards` slices of the
    batch on as many threads. Use as a context manager (or call close()) to stop the threads."""

    def __init__(self, model, shards=2):
        from threadpoolctl import ThreadpoolController
        self.model = model
        self.shards = shards
        # one thread per shard, always the same one, so that no per-thread state can move a
        # shard's float rounding between steps (malloc's arenas were such state; since numgpt
        # asks for one arena, numgpt/_threads.py, the threads share it)
        self.pools = [ThreadPoolExecutor(1, thread_name_prefix=f"numgpt-shard{i}")
                      for i in range(shards)]
        self.blas = ThreadpoolController().select(user_api="blas")

    def __call__(self, x, y, train=True, rng=None):
        from kernels import _jit
        B = x.shape[0]
        cuts = np.linspace(0, B, self.shards + 1).round().astype(int)
        parts = [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        seeds = rng.integers(0, 2 ** 63, size=len(parts)) if rng is not None else [None] * len(parts)
        weights = [len(a) / B for a, _ in parts]  # each shard's loss is a mean over its rows
        _jit.FORCE_SERIAL = True  # every kernel on its calling thread
        try:
            with self.blas.limit(limits=1):
                futures = [pool.submit(self.model.loss_and_grads, a, b, train,
                                       None if s is None else np.random.default_rng(s), w)
                           for pool, (a, b), s, w in zip(self.pools, parts, seeds, weights)]
                results = [f.result() for f in futures]
        finally:
            _jit.FORCE_SERIAL = False
        loss = sum(w * r[0] for w, r in zip(weights, results))
        grads = results[0][1]  # the shards' gradients come weighted: only their sum is left
        for r in results[1:]:
            for k, g in grads.items():
                g += r[1][k]
        return float(loss), grads

    def close(self):
        for pool in self.pools:
            pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class OneBlasThreadStep:
    """step(x, y, rng) -> model.loss_and_grads with BLAS on one thread: for small models, whose
    matrix products are too small to split (waking OpenBLAS's second thread costs more than it
    saves). Tiny preset here: 1.9 ms per step against 2.3 ms."""

    def __init__(self, model):
        from threadpoolctl import ThreadpoolController
        self.model = model
        self.blas = ThreadpoolController().select(user_api="blas")

    def __call__(self, x, y, train=True, rng=None):
        with self.blas.limit(limits=1):
            return self.model.loss_and_grads(x, y, train=train, rng=rng)


def fused_applies(cfg):
    """Whether kernels/step.py can run cfg's training steps: a GPT with the kernels on and no
    dropout (whose masks the layer-by-layer path draws)."""
    if not (cfg.kernels and cfg.model == "gpt" and cfg.n_layer >= 1 and cfg.dropout == 0):
        return False
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (numba's np.dot calls BLAS through it)
    except ImportError:
        return False
    return True


class FusedStep:
    """step(x, y) -> (loss, grads) of model.loss_and_grads in one compiled call (kernels/step.py):
    forward, backward and loss of small models without returning to Python, the batch split
    over the cores. The grads dict and its arrays are reused: each call overwrites the last
    call's gradients (the trainer uses them before the next step; copy them to keep them)."""

    def __init__(self, model, shards=None):
        from threadpoolctl import ThreadpoolController
        if not fused_applies(model.cfg):
            raise ValueError("the fused step needs a GPT with kernels on and no dropout")
        self.model = model
        self.shards = max(1, shards or cores())
        self.blas = ThreadpoolController().select(user_api="blas")  # SciPy's OpenBLAS included
        self._key = None

    def _bind(self):
        """Typed lists of the parameters (as 2-D views) and of the gradient slots, remade only
        when the model's parameter arrays were replaced (set_params)."""
        from numba.typed import List

        from kernels import step as ks
        from .model import param_shapes
        params = self.model.params
        key = tuple(map(id, params.values()))
        if key == self._key:
            return
        cfg = self.model.cfg
        names = list(param_shapes(cfg))
        views = [params[n].reshape(1, -1) if params[n].ndim == 1 else params[n] for n in names]
        self._P = List(views)
        self._G = List([np.zeros((self.shards,) + v.shape, dtype=v.dtype) for v in views])
        from .optim import ListedGrads
        order = list(params)  # the model's own order (the AdamW lists follow it)
        grad = {n: g[0].reshape(params[n].shape) for n, g in zip(names, self._G)}
        self._grads = ListedGrads({n: grad[n] for n in order},
                                  List([grad[n].reshape(-1) for n in order]))
        slots = np.full((cfg.n_layer, len(ks.LAYER_SLOTS)), -1, dtype=np.int64)
        where = {n: i for i, n in enumerate(names)}
        for layer in range(cfg.n_layer):
            for j, short in enumerate(ks.LAYER_SLOTS):
                slots[layer, j] = where.get(f"blocks.{layer}.{short}", -1)
        self._slots = slots
        self._top = np.array([where.get(n, -1) for n in ks.TOP_SLOTS], dtype=np.int64)
        C = cfg.n_embd
        self._wqkv = np.empty((cfg.n_layer, C, 3 * C), dtype=views[0].dtype)  # kernel scratch
        self._sums = np.zeros(self.shards, dtype=np.float64)
        self._arch = tuple(self.model.arch)  # numgpt/arch.py; a plain tuple: see train_step
        self._key = key

    def __call__(self, x, y, train=True, rng=None):
        from kernels import _jit
        from kernels import step as ks
        from .model import _check_ids
        m = self.model
        x = np.ascontiguousarray(_check_ids(x, m.cfg.vocab_size, "idx"), dtype=np.int64)
        y = np.ascontiguousarray(_check_ids(y, m.cfg.vocab_size, "targets"), dtype=np.int64)
        if y.shape != x.shape:
            raise ValueError(f"targets have shape {y.shape}, the inputs {x.shape}")
        if x.shape[1] > m.cfg.block_size:
            raise ValueError(f"sequence length {x.shape[1]} exceeds block_size {m.cfg.block_size}")
        self._bind()
        shards = min(self.shards, x.shape[0])
        kernel = ks.train_step if shards > 1 and _jit.threads_allowed() else ks.train_step.serial
        # OpenBLAS on one thread for the call, set directly (threadpoolctl's limit() took 17 us)
        libs = self.blas.lib_controllers
        before = [lib.num_threads for lib in libs]
        for lib, n in zip(libs, before):
            if n != 1:
                lib.set_num_threads(1)
        try:
            loss = kernel(x, y, self._P, self._G, self._slots, self._top, self._arch, shards,
                          self._wqkv, self._sums)
        finally:
            for lib, n in zip(libs, before):
                if n != 1:
                    lib.set_num_threads(n)
        return float(loss), self._grads


# batch * block * n_embd below which the fused step beats the sharded one (for a GPT without
# dropout). Measured here, alternating the two in one process after kernels/blas.py let the fused
# step run its attention products on the heads' columns in place: the laptop preset (batch 12,
# 98k) 3-6% faster fused (32.1 against 33.2 ms, 32.5 against 34.2, 35.8 against 38.7); at batch
# 12 with block 128 (197k) even (78.0 against 76.2); at batch 32 (262k) 7% slower, with n_embd
# 256 (393k) 5% slower, and the scaled preset at batch 8 without dropout (786k) 9% slower.
FUSED_MAX_WORK = 1 << 17


def uses_fused_step(cfg):
    """Whether step_function gives training cfg the fused step (small GPTs without dropout)."""
    return (cfg.batch_size * cfg.block_size * cfg.n_embd < FUSED_MAX_WORK and fused_applies(cfg)
            and switch("NUMGPT_FUSED"))


def step_function(model, cfg=None):
    """The fastest loss_and_grads for training cfg here: the fused compiled step for small GPTs
    without dropout (up to the laptop preset), a ShardedStep for mid-sized models, the model's
    own with one BLAS thread for small ones the fused step cannot run, else the model's own.
    Returns (function, closer)."""
    cfg = cfg or model.cfg
    if worth_sharding(cfg):
        s = ShardedStep(model, 2)
        return s, s.close
    if uses_fused_step(cfg) and fused_applies(model.cfg):
        return FusedStep(model), (lambda: None)
    if cfg.batch_size * cfg.block_size * cfg.n_embd < MIN_WORK and cores() >= 2:
        return OneBlasThreadStep(model), (lambda: None)
    return (lambda x, y, train=True, rng=None: model.loss_and_grads(x, y, train=train, rng=rng)), \
        (lambda: None)
