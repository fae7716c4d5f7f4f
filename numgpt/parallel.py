"""Data-parallel training steps on threads: the batch split in halves, one per core.

For mid-sized models the step is a long chain of medium-sized operations; OpenBLAS and the
numba kernels split each of them over the two cores, and the splitting (waking threads, small
pieces, waiting for the slower half) costs a good share of the second core. Measured here
(laptop preset, batch 12): 48.6 ms per step that way, 36 ms for half the batch on one thread.
So for such models each core takes half of the batch instead, with single-threaded BLAS and the
kernels' serial builds; each shard weights its gradients by its share of the batch, and the
two are added: 39.9 ms then, 29 ms with the later kernels. Both threads run while
the other is inside BLAS or a kernel, since those release the GIL; the Python between them
does not, which is why tiny models (all Python overhead) stay on the plain path.

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

MIN_WORK = 1 << 16  # batch * block * n_embd below which the plain path is faster (tiny models)
# and above which BLAS's and the kernels' own threads do better. Measured: the scaled preset at
# batch 8 (786k) steps in 886 ms sharded against 939 ms not (its dropout masks are then drawn on
# both cores, one generator each); at batch 64 (6.3M) in 8.37 s against 8.0 s.
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
    """Whether a training step of cfg goes faster split over the cores (see the module notes)."""
    B = batch_size or cfg.batch_size
    if os.environ.get("NUMGPT_DATA_PARALLEL", "").strip() in ("0", "false", "no", "off"):
        return False
    return (cfg.kernels and cfg.model == "gpt" and B >= 2 and cores() >= 2
            and MIN_WORK <= B * cfg.block_size * cfg.n_embd < MAX_WORK)


class ShardedStep:
    """step(x, y, rng) -> (loss, grads) of model.loss_and_grads, computed as `shards` slices of the
    batch on as many threads. Use as a context manager (or call close()) to stop the threads."""

    def __init__(self, model, shards=2):
        from threadpoolctl import ThreadpoolController
        self.model = model
        self.shards = shards
        # one thread per shard, always the same one: per-thread state (malloc arenas, hence
        # the alignment of temporaries) then cannot move a shard's float rounding between steps
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


def step_function(model, cfg=None):
    """The fastest loss_and_grads for training cfg here: a ShardedStep for mid-sized models, the
    model's own with one BLAS thread for small ones, else the model's own. Returns (function, closer)."""
    cfg = cfg or model.cfg
    if worth_sharding(cfg):
        s = ShardedStep(model, 2)
        return s, s.close
    if cfg.batch_size * cfg.block_size * cfg.n_embd < MIN_WORK and cores() >= 2:
        return OneBlasThreadStep(model), (lambda: None)
    return (lambda x, y, train=True, rng=None: model.loss_and_grads(x, y, train=train, rng=rng)), \
        (lambda: None)
