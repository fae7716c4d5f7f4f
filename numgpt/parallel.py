"""The training steps, and the choice among them by measurement on this machine.

Five ways to compute a step's loss and gradients, all of the same mean loss up to float rounding:

    fused_lanes  kernels/step.py: the whole forward and backward in one compiled call, the batch
                 split over the cores (GPTs with the kernels and no dropout), attention in lanes:
                 one vectorised sweep per offset over all rows (short blocks of small heads)
    fused        the same, attention per (sequence, head) in BLAS products
    sharded      the layer-by-layer path on one thread per core, a slice of the batch each, BLAS
                 on one thread and the kernels' serial builds in each (ShardedStep)
    one_blas     the layer-by-layer path with BLAS on one thread (small products do not pay for
                 waking a second BLAS thread)
    plain        the layer-by-layer path, BLAS and the kernels on their own threads

Which is fastest depends on the model's size and on the CPU (its matrix-product speed, caches,
how fast threads wake). So step_function times the candidates on a few batches of random ids
before training (the model's parameters and the run's random stream are left untouched; where a
whole step is long, on the model cut to fewer layers of the same shapes), takes the fastest, and
caches the choice for this machine, model shape and dtype, so later runs start at once.
NUMGPT_STEP=fused_lanes|fused|sharded|one_blas|plain forces one (tests use it);
NUMGPT_FUSED=0 and NUMGPT_DATA_PARALLEL=0 take the fused and the sharded steps out of the running.

Sharded steps: each shard draws its rows of the whole batch's dropout masks (BatchRows in
numgpt/layers/dropout.py), so every step trains a batch with the same masks. A run is
reproducible from its seed and checkpoint to float32 rounding, but not always bit for bit: now
and then, when the threads compute at once, a step's attention gradients of w_q and w_k differ
in the last place; the cause is not known (docs/kernels.md). The other steps are bit-exact, resume
included.
"""
import copy
import functools
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._threads import blas_pools, give_back_freed_memory, training_starts
from .arch import BLOCK_PARAMS, TOP_PARAMS
from .env import EnvError, choice, switch, thread_cap
from .layers.dropout import BatchRows


def copy_rng(rng):
    """An independent generator in rng's state (rng: a numpy Generator or a BatchRows of one)."""
    if isinstance(rng, BatchRows):
        return BatchRows(copy_rng(rng.rng), rng.first)
    return copy.deepcopy(rng)


def advance_like(rng, other):
    """Put rng (a Generator or BatchRows) in the state of other (a copy of it that drew since)."""
    while isinstance(rng, BatchRows):
        rng = rng.rng
    while isinstance(other, BatchRows):
        other = other.rng
    rng.bit_generator.state = other.bit_generator.state


def cores():
    """The cores this process may use, capped by the usual thread-count variables when set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    cap = thread_cap()
    return n if cap is None else min(n, cap)


class ShardedStep:
    """step(x, y, rng) -> (loss, grads) of model.loss_and_grads, computed as `shards` slices of the
    batch (default: one per core, cores()) on as many threads; a batch of fewer rows than shards
    runs on fewer. Use as a context manager (or call close()) to stop the threads."""

    def __init__(self, model, shards=None):
        self.model = model
        self.shards = max(1, shards or cores())
        # malloc's one arena for all threads, asked for before the shards' threads first
        # allocate (a thread takes its arena then, and keeps it)
        training_starts()
        # one thread per shard, always the same one, so that no per-thread state can move a
        # shard's float rounding between steps (malloc's arenas were such state; since numgpt
        # asks for one arena, numgpt/_threads.py, the threads share it)
        self.pools = [ThreadPoolExecutor(1, thread_name_prefix=f"numgpt-shard{i}")
                      for i in range(self.shards)]
        self.blas = blas_pools()

    def __call__(self, x, y, train=True, rng=None):
        from numgpt.kernels import _jit
        B = x.shape[0]
        cuts = np.linspace(0, B, self.shards + 1).round().astype(int)
        rows = [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        weights = [(b - a) / B for a, b in rows]  # each shard's loss is a mean over its rows
        # each shard draws its rows of the whole batch's dropout masks from a copy of rng
        # (numgpt/layers/dropout.py, BatchRows); all copies end where rng would have
        streams = [None if rng is None else BatchRows(copy_rng(rng), a) for a, _ in rows]
        _jit.FORCE_SERIAL = True  # every kernel on its calling thread
        try:
            with self.blas.limit(limits=1):
                futures = [pool.submit(self.model.loss_and_grads, x[a:b], y[a:b], train, r, w)
                           for pool, (a, b), r, w in zip(self.pools, rows, streams, weights)]
                results = [f.result() for f in futures]
        finally:
            _jit.FORCE_SERIAL = False
        if rng is not None:
            advance_like(rng, streams[0])
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
    saves)."""

    def __init__(self, model):
        self.model = model
        self.blas = blas_pools()
        training_starts()
        threads_measured(model.cfg)  # with BLAS's own threads, before this step limits them

    def __call__(self, x, y, train=True, rng=None):
        if not self.model.cfg.kernels:
            with self.blas.limit(limits=1):
                return self.model.loss_and_grads(x, y, train=train, rng=rng)
        from numgpt.kernels import _jit
        _jit.ONE_BLAS_THREAD = True  # per-head products whole too (kernels/ops._bmm)
        try:
            with self.blas.limit(limits=1):
                return self.model.loss_and_grads(x, y, train=train, rng=rng)
        finally:
            _jit.ONE_BLAS_THREAD = False


def threads_measured(cfg):
    """For a model with the kernels: from how much work their threaded builds run on this machine
    (kernels._jit.parallel_min_work: cached, else measured now, with BLAS's threads as a plain
    step has them; the one-BLAS-thread step and the step measurement ask before they limit
    them)."""
    if cfg.kernels:
        from numgpt.kernels._jit import parallel_min_work, threads_allowed
        if threads_allowed():
            parallel_min_work()


def fused_applies(cfg):
    """Whether kernels/step.py can run cfg's training steps: a GPT with the kernels on and no
    dropout (whose masks the layer-by-layer path draws)."""
    return cfg.dropout == 0 and compiled_forward_applies(cfg)


def compiled_forward_applies(cfg):
    """Whether kernels/step.py can run cfg's forward pass (sampling's, any dropout: none is done
    there): a GPT with the kernels on, and SciPy's BLAS for the compiled code to call."""
    if not (cfg.kernels and cfg.model == "gpt" and cfg.n_layer >= 1):
        return False
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (numba's np.dot calls BLAS through it)
    except ImportError:
        return False
    return True


# Lanes run one sweep per channel of a head and per offset, so their cost grows with block x head
# size^2 where BLAS's per-head products only get more efficient; past this they are not measured
# (docs/kernels.md, "Attention in lanes").
LANES_CANDIDATE_MAX = 2 ** 14


def lanes_may_win(cfg):
    """Whether attention in lanes is worth measuring against BLAS for cfg's blocks and heads."""
    return cfg.block_size * cfg.head_size ** 2 <= LANES_CANDIDATE_MAX


def step_params(model):
    """(P, slots, top): model's parameters as kernels/step.py takes them: P a numba typed List of
    2-D views in numgpt.model.param_shapes order (vectors as [1, n] rows), slots [L, n] each
    layer's by its place in numgpt.arch.BLOCK_PARAMS and top the model's others by TOP_PARAMS
    (indices into P, -1 where the model has no such parameter). P's arrays are the model's own:
    they follow in-place updates, not a set_params."""
    from numba.typed import List

    from .model import param_shapes
    cfg, params = model.cfg, model.params
    names = list(param_shapes(cfg))
    P = List([params[n].reshape(1, -1) if params[n].ndim == 1 else params[n] for n in names])
    where = {n: i for i, n in enumerate(names)}
    slots = np.array([[where.get(f"blocks.{layer}.{short}", -1) for short in BLOCK_PARAMS]
                      for layer in range(cfg.n_layer)], dtype=np.int64)
    top = np.array([where.get(n, -1) for n in TOP_PARAMS], dtype=np.int64)
    return P, slots, top


class FusedStep:
    """step(x, y) -> (loss, grads) of model.loss_and_grads in one compiled call (kernels/step.py):
    forward, backward and loss of small models without returning to Python, the batch split
    over the cores; lanes: attention in lanes, else per head in BLAS (the same gradients).
    The grads dict and its arrays are reused: each call overwrites the last call's gradients
    (the trainer uses them before the next step; copy them to keep them)."""

    def __init__(self, model, shards=None, lanes=False):
        if not fused_applies(model.cfg):
            raise ValueError("the fused step needs a GPT with kernels on and no dropout")
        self.model = model
        self.lanes = bool(lanes)
        self.shards = max(1, shards or cores())
        self.blas = blas_pools()  # SciPy's OpenBLAS included
        self._key = None
        training_starts()  # malloc keeps the steps' freed memory from now on (_threads.py)

    def _bind(self):
        """Typed lists of the parameters (as 2-D views) and of the gradient slots, remade only
        when the model's parameter arrays were replaced (set_params)."""
        from numba.typed import List

        from .model import param_shapes
        params = self.model.params
        key = tuple(map(id, params.values()))
        if key == self._key:
            return
        cfg = self.model.cfg
        names = list(param_shapes(cfg))
        self._P, self._slots, self._top = step_params(self.model)
        self._G = List([np.zeros((self.shards,) + v.shape, dtype=v.dtype) for v in self._P])
        from .optim import ListedGrads
        order = list(params)  # the model's own order (the AdamW lists follow it)
        grad = {n: g[0].reshape(params[n].shape) for n, g in zip(names, self._G)}
        self._grads = ListedGrads({n: grad[n] for n in order},
                                  List([grad[n].reshape(-1) for n in order]))
        C = cfg.n_embd
        self._wqkv = np.empty((cfg.n_layer, C, 3 * C), dtype=self._P[0].dtype)  # kernel scratch
        self._sums = np.zeros(self.shards, dtype=np.float64)
        self._arch = tuple(self.model.arch)  # numgpt/arch.py; a plain tuple: see train_step
        self._key = key

    def __call__(self, x, y, train=True, rng=None):
        from numgpt.kernels import _jit
        from numgpt.kernels import step as ks
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
        # OpenBLAS on one thread for the call, set directly (threadpoolctl's limit() costs more)
        libs = self.blas.lib_controllers
        before = [lib.num_threads for lib in libs]
        for lib, n in zip(libs, before):
            if n != 1:
                lib.set_num_threads(1)
        try:
            loss = kernel(x, y, self._P, self._G, self._slots, self._top, self._arch, self.lanes,
                          shards, self._wqkv, self._sums)
        finally:
            for lib, n in zip(libs, before):
                if n != 1:
                    lib.set_num_threads(n)
        return float(loss), self._grads


class PlainStep:
    """step(x, y, rng) -> model.loss_and_grads, BLAS and the kernels on their own threads."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, y, train=True, rng=None):
        return self.model.loss_and_grads(x, y, train=train, rng=rng)


STEPS = ("fused_lanes", "fused", "sharded", "one_blas", "plain")
FUSED = ("fused_lanes", "fused")


def candidates(cfg):
    """The steps to measure for training cfg here, in STEPS order (NUMGPT_STEP forces one: then
    only it, or a one-line EnvError where it cannot run cfg). fused_lanes can run every model
    the fused step runs, but is measured only where lanes_may_win."""
    ok = []
    if fused_applies(cfg) and switch("NUMGPT_FUSED"):
        ok += list(FUSED)
    if (cfg.kernels and cfg.model == "gpt" and cfg.batch_size >= 2 and cores() >= 2
            and switch("NUMGPT_DATA_PARALLEL")):
        ok.append("sharded")
    if cores() >= 2:
        ok.append("one_blas")
    ok.append("plain")
    forced = choice("NUMGPT_STEP")
    if forced:
        if forced not in ok:
            raise EnvError(f"NUMGPT_STEP={forced} cannot train this model here (it can: "
                           f"{', '.join(ok)})")
        return [forced]
    return [n for n in ok if n != "fused_lanes" or lanes_may_win(cfg)]


def make_step(name, model):
    """(step, closer) for one of STEPS."""
    if name in FUSED:
        return FusedStep(model, lanes=name == "fused_lanes"), (lambda: None)
    if name == "sharded":
        s = ShardedStep(model)
        return s, s.close
    if name == "one_blas":
        return OneBlasThreadStep(model), (lambda: None)
    return PlainStep(model), (lambda: None)


# the measurement: every candidate warms up with one untimed step, then all take turns, a timed
# step each per round, until the rounds have taken MEASURE_SECONDS in all (at least MIN_ROUNDS
# rounds, so that a median decides and not one step's luck; at most MAX_ROUNDS); a candidate over
# SLOW_FACTOR times the best so far drops out after a round (the rounds end when one is left:
# a long step is not timed again with nothing to compare it to), and one whose warm-up took over
# WARM_FACTOR times the quickest and over WARM_SECONDS, twice, does not take turns. Where the two
# best end within CLOSE_FACTOR of each other, those two take turns as long again (at least
# MIN_ROUNDS rounds more): a close call on three long steps is a coin toss on a noisy machine.
# The choices file keeps at most MAX_CHOICES entries, the newest. Where MIN_ROUNDS rounds of the
# warm-up steps' lengths come to over ANNOUNCE_SECONDS, the user is told before the rounds start.
# Where a whole step is long (n_layer times one layer's step over LONG_STEP_SECONDS), all of this
# runs on the model cut to as many layers as fit in LONG_STEP_SECONDS (layers_to_time): a model
# whose steps take seconds is measured in seconds, not minutes.
MEASURE_SECONDS = 0.6
ANNOUNCE_SECONDS = 5.0
MIN_ROUNDS = 3
MAX_ROUNDS = 25
SLOW_FACTOR = 1.5
WARM_FACTOR = 3.0
WARM_SECONDS = 0.5
CLOSE_FACTOR = 1.1
MAX_CHOICES = 200
LONG_STEP_SECONDS = 0.25


def time_in_turns(run, names, seconds, max_rounds, clock, slow=None):
    """{name: [seconds of each timed run(name)]}: the candidates names run in turns, one timed
    call each per round, the order rotating, for at least MIN_ROUNDS rounds (so that a median
    decides, not one call's luck), then until `seconds` are spent or max_rounds are done. With
    slow, a candidate whose median is over slow times the best one's drops out after a round,
    and the rounds end when one is left.
    The step measurement here and the decoder's layout measurement (numgpt/generate.py) use it."""
    times = {n: [] for n in names}
    live, spent = list(names), 0.0
    for r in range(max_rounds):
        for n in live[r % len(live):] + live[:r % len(live)]:
            t0 = clock()
            run(n)
            times[n].append(clock() - t0)
            spent += times[n][-1]
        if slow is not None:
            best = min(float(np.median(times[n])) for n in live)
            live = [n for n in live if float(np.median(times[n])) <= slow * best]
            if len(live) == 1:  # the others are far behind: nothing left to compare
                break
        if spent >= seconds and r + 1 >= MIN_ROUNDS:
            break
    return times


class StepTimes(dict):
    """{name: median seconds of a step} as measure_steps measured them; .layers: on how many of
    the model's layers (all of them, unless a whole step is long: layers_to_time)."""

    def __init__(self, times, layers):
        super().__init__(times)
        self.layers = layers


def measure_steps(model, cfg, names, clock=None, seed=0, say=None):
    """StepTimes for the candidate steps names, timed in turns on batches of random ids (the
    model's parameters and the caller's random streams are not touched). Where a whole step is
    long, on a model of cfg's shapes cut to fewer layers (layers_to_time). Where the steps are
    long even so (MIN_ROUNDS rounds of their warm-ups over ANNOUNCE_SECONDS), says so through
    say(msg) before the timed rounds."""
    import time
    clock = clock or time.perf_counter
    rng = np.random.default_rng(seed)
    shape = (cfg.batch_size, cfg.block_size)
    x = rng.integers(0, cfg.vocab_size, shape)
    y = rng.integers(0, cfg.vocab_size, shape)
    training_starts()  # before any candidate's threads allocate (see ShardedStep)
    threads_measured(cfg)
    layers = layers_to_time(model, cfg, x, y, clock, seed)
    timed = model if layers == cfg.n_layer else cut_model(model, cfg, layers, seed)
    steps = {n: make_step(n, timed) for n in names}
    times = {}
    try:
        def run(n):
            t0 = clock()
            steps[n][0](x, y, train=True, rng=np.random.default_rng(seed))
            return clock() - t0

        # warm-up: first-call costs (typed lists, thread pools, page faults, compiled code loaded)
        warm = {n: run(n) for n in names}

        def behind(n):  # far behind, on a long step (a short warm-up says little)
            return warm[n] > max(WARM_FACTOR * min(warm.values()), WARM_SECONDS)
        for n in [n for n in names if behind(n)]:
            warm[n] = run(n)  # once more: its first call may have been loading code
        live = [n for n in names if not behind(n)]
        if say is not None and MIN_ROUNDS * sum(warm[n] for n in live) > ANNOUNCE_SECONDS:
            firsts = ", ".join(f"{warm[n]:.1f}" for n in live)
            say(f"step: timing {', '.join(live)}, a few steps each{_on_layers(layers, cfg)}, to "
                f"train on the fastest (their first took {firsts} s; once for this machine and "
                f"model, then cached) ...")
        times = time_in_turns(run, live, MEASURE_SECONDS, MAX_ROUNDS, clock, slow=SLOW_FACTOR)
        best = sorted(live, key=lambda n: float(np.median(times[n])))[:2]
        if len(best) == 2 and (float(np.median(times[best[1]]))
                               <= CLOSE_FACTOR * float(np.median(times[best[0]]))):
            more = time_in_turns(run, best, MEASURE_SECONDS, MAX_ROUNDS, clock)
            for n in best:
                times[n] += more[n]
    finally:
        for _, close in steps.values():
            close()
        give_back_freed_memory()  # the candidates' heaps, which training's own step need not reuse
    return StepTimes({n: float(np.median(t)) for n, t in times.items() if t}, layers)


def layers_to_time(model, cfg, x, y, clock, seed=0):
    """On how many of cfg's layers the candidate steps are timed: all of them, unless cfg is a
    GPT of several layers whose whole step is long: one layer's plain step on x, y is timed, and
    where n_layer such steps come to over LONG_STEP_SECONDS, the candidates are timed on as many
    layers as fit in it (at least one): every product and kernel of a layer at its real shape,
    only fewer of them."""
    if cfg.model != "gpt" or cfg.n_layer < 2:
        return cfg.n_layer
    one = cut_model(model, cfg, 1, seed)
    for _ in range(2):  # the second call timed: the first pays first calls' costs
        t0 = clock()
        one.loss_and_grads(x, y, train=True, rng=np.random.default_rng(seed))
        t = clock() - t0
    if cfg.n_layer * t <= LONG_STEP_SECONDS:
        return cfg.n_layer
    return max(1, int(LONG_STEP_SECONDS / t))


def cut_model(model, cfg, layers, seed=0):
    """A model of cfg (model's dtype) with only its first `layers` layers, of random weights."""
    from .model import GPT
    return GPT(cfg.replace(n_layer=layers), seed=seed,
               dtype=model.dtype if model is not None else np.float32)


def _on_layers(layers, cfg):
    return f" on {layers} of the model's {cfg.n_layer} layers" if layers < cfg.n_layer else ""


SHAPE_FIELDS = ("model", "vocab_size", "block_size", "n_embd", "n_head", "n_layer", "attn_proj",
                "ffn_mult", "ffn_proj", "activation", "residual", "norm", "dropout", "kernels",
                "batch_size")


@functools.lru_cache(maxsize=1)
def cpu():
    """This CPU in one line, for the choices cached per machine and beside every measured
    figure: its model name (/proc/cpuinfo, else platform.processor()), the name LLVM gives it
    (what numba compiles the kernels for: znver3, sapphirerapids, ...), its vector extensions
    and last-level cache. A model name alone can hide the difference: "AMD EPYC" names CPUs
    with and without AVX-512."""
    import platform

    from llvmlite import binding
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), name)
    except OSError:
        pass
    features = binding.get_host_cpu_features()
    vector = ("AVX-512" if features.get("avx512f") else "AVX2, no AVX-512" if features.get("avx2")
              else "no AVX2")
    parts = [binding.get_host_cpu_name(), vector]
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            size = f.read().strip()   # e.g. 32768K
        kb = int(size[:-1]) * (1024 if size.endswith("M") else 1)
        parts.append(f"L3 {kb >> 10} MB" if kb >= 1024 else f"L3 {kb} KB")
    except (OSError, ValueError):
        pass
    return f"{name} ({'; '.join(parts)})"


@functools.lru_cache(maxsize=1)
def _cpu_features():
    """A short hash of every feature LLVM finds on this CPU (numba's code depends on them)."""
    import hashlib

    from llvmlite import binding
    return hashlib.sha256(binding.get_host_cpu_features().flatten().encode()).hexdigest()[:12]


def measured_key(shape, names):
    """What a cached choice is valid for: this machine (CPU, its features, cores, NumPy and
    numba), the shape of the work (a dict) and the candidates (names). Used for the training
    step here and for the decoder's weight layout (numgpt/generate.py)."""
    import numba
    return json.dumps([cpu(), _cpu_features(), cores(), np.__version__, numba.__version__, shape,
                       list(names)], sort_keys=True)


def _choice_key(cfg, names, dtype="float32"):
    """The key of a training step's choice for cfg among names, for a model of that dtype
    (train.py's is float32; measured_key). Without the kernels, numgpt's own sources are in the
    key too (_sources_stamp): the kernels' choices are measured again after a change by their
    cache folder's name, the NumPy layers' by this."""
    shape = {k: getattr(cfg, k) for k in SHAPE_FIELDS}
    shape["dtype"] = np.dtype(dtype).name
    if not cfg.kernels:
        shape["sources"] = _sources_stamp()
    return measured_key(shape, names)


@functools.lru_cache(maxsize=1)
def _sources_stamp():
    """A short hash of numgpt's Python sources (the package's folder, every file in it)."""
    import glob
    import hashlib
    top = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(top, "**", "*.py"), recursive=True)):
        with open(path, "rb") as f:
            h.update(os.path.relpath(path, top).encode() + b"\0" + f.read())
    return h.hexdigest()[:12]


def _dtype_of(model):
    return model.dtype.name if model is not None else "float32"


def cached_choice(key, names, kernels=True):
    """The name cached under key (one of names), or None."""
    row = _read_choices(_choices_path(kernels)).get(key)
    return row["step"] if isinstance(row, dict) and row.get("step") in names else None


def cache_choice(key, best, times, kernels=True):
    """Cache best (and the measured seconds of every candidate) under key."""
    _write_choice(_choices_path(kernels), key,
                  {"step": best, "ms": {n: round(1000 * t, 4) for n, t in times.items()}})


def fastest(key, names, measure, kernels=True):
    """(name, times): the fastest of names for the work key describes (measured_key): the choice
    cached under key, with times None, else measure() -> {name: median seconds}, whose fastest is
    taken (and cached) and returned with those times. kernels: whether the work runs the
    kernels (the file the choice is cached in: _choices_path). The training step, the decoder's
    weight layout (numgpt/generate.py) and the stacked products' way (kernels/ops.py) are
    chosen through it."""
    best = cached_choice(key, names, kernels)
    if best is not None:
        return best, None
    times = measure()
    best = min(times, key=times.get)
    cache_choice(key, best, times, kernels)
    return best, times


def _choices_path(kernels=True):
    """The file of cached choices. For work that runs the kernels, beside the compiled kernels
    (their folder is named by a hash of the kernels' sources, so new kernels measure again); for
    the NumPy layers' steps (--kernels=false), in the folder that holds the kernels' caches,
    found without loading the kernels (numgpt/paths.py)."""
    if kernels:
        from numgpt.kernels._jit import CACHE_DIR
        return os.path.join(CACHE_DIR, "step-choices.json")
    import importlib.util

    from .paths import kernel_cache_base
    spec = importlib.util.find_spec("numgpt.kernels")
    folder = os.path.dirname(spec.origin) if spec is not None and spec.origin else ""
    return os.path.join(kernel_cache_base(folder), "numpy-step-choices.json")


def _read_choices(path):
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError, RecursionError):  # missing, unreadable or damaged: measure again
        return {}


def _write_choice(path, key, row):
    from .data import atomic_write_bytes
    d = _read_choices(path)
    d.pop(key, None)
    d[key] = row  # last: the newest
    d = dict(list(d.items())[-MAX_CHOICES:])
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_bytes(path, json.dumps(d, indent=0, sort_keys=True).encode("utf-8"))
    except OSError:  # a read-only cache: the next run measures again
        pass


def planned_step(cfg, prefer=None, dtype="float32"):
    """The step choose_step will take without measuring (forced, the only one, prefer, or cached)
    for a model of cfg in dtype, or None where it will measure."""
    names = candidates(cfg)
    if len(names) == 1:
        return names[0]
    if prefer in names:
        return prefer
    return cached_choice(_choice_key(cfg, names, dtype), names, cfg.kernels)


def choose_step(model, cfg, prefer=None, say=None, clock=None):
    """The name of the fastest step for training cfg here, and says which in one line:
    prefer (a resumed run's step) where it can still run, else a cached choice for this machine,
    shape and model dtype, else measured now (and cached)."""
    say = say or (lambda msg: None)
    names = candidates(cfg)
    if len(names) == 1:
        why = "NUMGPT_STEP" if choice("NUMGPT_STEP") else "the only one that can run it here"
        say(f"step: {names[0]} ({why})")
        return names[0]
    if prefer in names:
        say(f"step: {prefer} (the step this run trained with)")
        return prefer
    best, times = fastest(_choice_key(cfg, names, _dtype_of(model)), names,
                          lambda: measure_steps(model, cfg, names, clock=clock, say=say),
                          kernels=cfg.kernels)
    if times is None:
        say(f"step: {best} (measured on this machine before; cached in "
            f"{_choices_path(cfg.kernels)})")
        return best
    shown = ", ".join(f"{n} {_duration(t)}" for n, t in sorted(times.items(),
                                                               key=lambda kv: kv[1]))
    on = _on_layers(getattr(times, "layers", cfg.n_layer), cfg)
    say(f"step: {best}, the fastest measured here ({on[1:] + ': ' if on else ''}{shown})")
    return best


def _duration(seconds):
    return f"{1000 * seconds:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def step_function(model, cfg=None, prefer=None, say=None):
    """(step, closer, name): the fastest step for training cfg on this machine (choose_step)."""
    cfg = cfg or model.cfg
    name = choose_step(model, cfg, prefer=prefer, say=say)
    step, close = make_step(name, model)
    return step, close, name


class TrainingStep:
    """The training step train.py takes, for a model built with the Python API:

        with numgpt.training_step(model) as step:   # measured here once, then cached
            loss, grads = step(x, y, rng=rng)       # as model.loss_and_grads(x, y, rng=rng)

    It chooses as train.py does (choose_step: NUMGPT_STEP, else the choice cached for this
    machine, model shape and dtype, else measured now) and says which through say(msg), if given;
    .name is the step's name (STEPS). The loss and gradients are model.loss_and_grads's up to
    float rounding, but the fused steps reuse one grads dict: each call overwrites the last
    call's gradients (copy them to keep them). close() (or the end of the with block) stops the
    sharded step's threads."""

    def __init__(self, model, say=None):
        self.model = model
        cfg = model.cfg
        if cfg.kernels and planned_step(cfg, dtype=model.dtype) is None:
            # loaded (or compiled, said on stderr) before the candidates are timed, as train.py
            # does: a first call's loading would otherwise count against its step
            from numgpt.kernels import warmup
            warmup(model.dtype.name, say=say, fused=fused_applies(cfg))
        self._step, self._close, self.name = step_function(model, cfg, say=say)

    def __call__(self, x, y, rng=None, train=True):
        return self._step(x, y, train=train, rng=rng)

    def close(self):
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
