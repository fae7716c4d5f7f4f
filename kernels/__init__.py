"""numba twins of numgpt's hot layers. Each kernel has its NumPy reference in numgpt/layers;
tests/test_kernels.py holds the two equal, and the gradient checks run with both.

    attention.py    causal attention's softmax between BLAS's products, forward and backward
    layernorm.py    LayerNorm forward/backward
    activations.py  bias + ReLU/GELU forward/backward
    loss.py         softmax cross-entropy with its gradient in one pass
    embedding.py    token + position embedding forward/backward
    dropout.py      dropout masks drawn on all cores (the reference's bits)
    adamw.py        the AdamW update in one pass (also over a list of tensors in one call)
    step.py         a small model's whole training step in one call, the batch split over cores
    decode.py       generation's one-token step with the key/value cache, in one call
    blas.py         BLAS's matrix product on strided views, from compiled code (for step.py)
    ops.py          the kernel set with the same API as numgpt.ops.REFERENCE
    _jit.py         the shared compile options, the threaded/serial builds and the choice
                    between them, the kernels' cache, and numgpt/arch.py's block compiled for
                    step.py and decode.py
"""
import contextlib
import glob
import os
import sys
import time

from . import _jit  # noqa: F401  (first: the thread settings, numgpt/_threads.py)

KERNEL_NAMES = {"attention": ["softmax_causal_fwd", "softmax_causal_bwd"],
                "layernorm": ["layernorm_fwd", "layernorm_bwd"],
                "activations": ["bias_act_fwd", "bias_act_bwd"],
                "loss": ["cross_entropy_fwd_bwd"], "embedding": ["embed_fwd", "embed_bwd"],
                "adamw": ["adamw_update"], "dropout": ["keep_fill", "dropout_fill"]}
FUSED_NAMES = {"step": ["train_step"]}  # compiled where SciPy is there (numgpt.parallel.FusedStep)
SINGLE_NAMES = {"adamw": ["adamw_update_lists", "sum_squares_lists", "scale_lists"]}


def _cache_dir():
    from ._jit import CACHE_DIR  # named by a hash of the kernel sources (see _jit.py)
    return CACHE_DIR


def _cached(mod, name):
    return bool(glob.glob(os.path.join(_cache_dir(), "**", f"{mod}.{name}-*.nbi"), recursive=True))


@contextlib.contextmanager
def _announced(cold, what, say):
    """Tell the user that (and how long) numba compiles, when the on-disk cache is cold."""
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.time()
    if cold and not _jit.CACHE_WRITABLE:
        say(f"compiling numba kernels{what} (not cached: {_cache_dir()} cannot be written; "
            "set NUMBA_CACHE_DIR to a writable folder) ...")
    elif cold:
        say(f"compiling numba kernels{what} (first run only; cached in {_cache_dir()}) ...")
    yield
    if cold:
        say(f"compiled in {time.time() - t0:.0f} s")


def cache_is_warm(fused=True):
    """True when numba's on-disk cache holds every kernel (with its serial twin) and the decoder,
    and, with fused, the fused training step of small models (where SciPy is there to run it)."""
    fused = fused and _fused_possible()
    return (all(_cached(mod, name + suffix)
                for mod, names in {**KERNEL_NAMES, **(FUSED_NAMES if fused else {})}.items()
                for name in names for suffix in ("", "_serial"))
            and (not fused or all(_cached(mod, name) for mod, names in SINGLE_NAMES.items()
                                  for name in names))
            and decode_cache_is_warm())


def _fused_possible():
    try:
        import scipy.linalg.cython_blas  # noqa: F401
    except ImportError:
        return False
    return True


def decode_names():
    """The compiled functions of kernels/decode.py that cache their own code (not the block's
    pieces, which are inlined into decode_step and cached in its code)."""
    from numba.core.registry import CPUDispatcher

    from . import decode
    return [name for name, f in vars(decode).items() if isinstance(f, CPUDispatcher)
            and f.py_func.__module__ == decode.__name__
            and f.targetoptions.get("inline") != "always"]


def decode_cache_is_warm():
    """Whether sampling's compiled code is all cached: the decoder and, where SciPy is there,
    the prefill (kernels/step.py's forward pass over a whole context)."""
    return (all(_cached("decode", name) for name in decode_names())
            and (not _fused_possible() or _cached("step", "prefill")))


def warmup_decode(dtype="float32", say=None):
    """Compile (or load) sampling's kernels (kernels/decode.py's one-token decoder, the prefill
    of kernels/step.py), saying so when they compile."""
    import numpy as np

    from numgpt.config import get_config
    from numgpt.generate import generate
    from numgpt.model import GPT
    with _announced(not decode_cache_is_warm(), " for sampling", say):
        m = GPT(get_config("laptop", n_embd=8, n_head=2, n_layer=1, block_size=4, vocab_size=5),
                dtype=np.dtype(dtype))
        generate(m, np.zeros((1, 1), dtype=np.int64), 6, rng=np.random.default_rng(0))  # all paths


def warmup(dtype="float32", say=None, fused=True):
    """Compile (or load from cache) every kernel for dtype, telling the user when it compiles.
    fused=False leaves out the fused step of small models (kernels/step.py, about half of a
    cold compile), for a run that will not use it."""
    import numpy as np

    from numgpt.config import get_config
    from numgpt.model import GPT
    from numgpt.optim import AdamW, clip_grad_norm
    from numgpt.parallel import FusedStep, fused_applies

    from . import _jit, ops
    store = ops.STORE_PROBS_BYTES
    with _announced(not cache_is_warm(fused), "", say):
        try:
            for serial in (True, False):  # the serial twins, then the parallel kernels
                _jit.FORCE_SERIAL, _jit.FORCE_THREADS = serial, not serial
                for act, stored in (("relu", True), ("gelu", False)):  # probabilities kept or not
                    ops.STORE_PROBS_BYTES = store if stored else -1
                    cfg = get_config("laptop", n_embd=8, n_head=2, n_layer=1, block_size=4,
                                     vocab_size=5, dropout=0.1, activation=act, kernels=True)
                    m = GPT(cfg, dtype=dtype)
                    rng = np.random.default_rng(0)
                    x = rng.integers(0, 5, (2, 4))
                    loss, grads = m.loss_and_grads(x, x, rng=rng)
                    m.loss(x, x)
                    AdamW(m.params, use_kernels=True).step(grads)
                    if fused and stored and fused_applies(cfg.replace(dropout=0.0)):
                        m = GPT(cfg.replace(dropout=0.0), dtype=dtype)
                        loss, grads = FusedStep(m, shards=2)(x, x)
                        clip_grad_norm(grads, 1e-3)
                        AdamW(m.params, use_kernels=True).step(grads)
            warmup_decode(dtype, say=lambda msg: None)
        finally:
            _jit.FORCE_SERIAL = _jit.FORCE_THREADS = False
            ops.STORE_PROBS_BYTES = store
