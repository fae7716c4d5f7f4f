"""Inverted dropout: zero each element with probability p, scale the survivors by 1/(1-p).

The keep-mask is a function of one number drawn from an explicit numpy Generator (so a gradient
check replays it exactly by handing the same seed to every evaluation) and of each element's
position: element i of a mask is kept when the top 32 bits of a 64-bit hash of (seed, i) are at
least p * 2^32. The hash is SplitMix64's output function over the counter seed + (i + 1) *
0x9E3779B97F4A7C15, whose outputs pass the usual batteries of statistical tests; p is rounded to
a multiple of 2^-32. Why not rng.random(shape) >= p: a mask made that way can only be drawn by
NumPy, one element after another on one core, while this one is the same bits from NumPy here and from the parallel
compiled kernel in kernels/dropout.py, which draws it on all cores at a fraction of the cost.

A slice of a batch (the data-parallel steps: a thread's or an MPI rank's rows) draws through
BatchRows(rng, first): the same seeds from rng as the whole batch would draw, and each mask is
rows first.. of the whole batch's mask. Every mask is [B, ...] with the batch first, so those rows
are the elements from first * (the size of a row) on, and since the hash's counter advances by
GOLDEN per element, starting it k elements further is adding k * GOLDEN to the seed (draw_seed).
So a batch trained in slices, on any number of threads or ranks, gets the masks it gets whole.

Derivation: docs/derivations.md#dropout
Gradient check: tests/test_layers.py::test_dropout_grad
"""
import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)   # SplitMix64's counter step
MIX1 = np.uint64(0xBF58476D1CE4E5B9)     # and its output function's two multipliers
MIX2 = np.uint64(0x94D049BB133111EB)
_CHUNK = 1 << 20  # elements hashed at a time (bounds the uint64 temporaries)


def keep_threshold(p):
    """The keep test's threshold for drop probability p: keep when hash >> 32 >= this."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return np.uint64(min(round(p * 2.0 ** 32), 2 ** 32))


class BatchRows:
    """The random stream of rows first, first + 1, ... of a batch, for a step that computes only
    those rows: it draws from rng exactly what the whole batch would (so rng ends in the same
    state), and a dropout mask drawn through it is those rows of the whole batch's mask. Rows of
    rows add up: BatchRows(BatchRows(rng, 6), 3) is BatchRows(rng, 9)."""

    def __init__(self, rng, first):
        if isinstance(rng, BatchRows):
            rng, first = rng.rng, rng.first + first
        self.rng = rng
        self.first = int(first)

    def integers(self, *args, **kwargs):
        return self.rng.integers(*args, **kwargs)


def draw_seed(rng, shape):
    """The one number a mask of the given shape ([B, ...]) takes from the caller's Generator (or
    BatchRows: then the seed is moved on to the mask's row `first`)."""
    seed = int(rng.integers(0, 2 ** 63))
    if isinstance(rng, BatchRows) and rng.first:
        row = int(np.prod(shape[1:]))
        seed = (seed + rng.first * row * int(GOLDEN)) % 2 ** 64
    return np.uint64(seed)


def hash_keep(seed, thr, n):
    """keep[i] = splitmix64(seed + (i + 1) * GOLDEN) >> 32 >= thr for i < n (bool [n])."""
    keep = np.empty(n, dtype=bool)
    with np.errstate(over="ignore"):  # the arithmetic is modulo 2^64 by design
        for a in range(0, n, _CHUNK):
            z = np.arange(a + 1, min(n, a + _CHUNK) + 1, dtype=np.uint64)
            z *= GOLDEN
            z += seed
            z ^= z >> np.uint64(30)
            z *= MIX1
            z ^= z >> np.uint64(27)
            z *= MIX2
            z ^= z >> np.uint64(31)
            keep[a:a + z.size] = (z >> np.uint64(32)) >= thr
    return keep


def keep_mask(rng, shape, p):
    """A bool keep-mask of the given shape for drop probability p, from one draw of rng."""
    n = int(np.prod(shape))
    return hash_keep(draw_seed(rng, shape), keep_threshold(p), n).reshape(shape)


def dropout_forward(x, p, rng=None, mask=None):
    """x: [...] -> y [...], cache (the scaled mask, or None when dropout is off)

    p: drop probability in [0, 1). rng: numpy Generator the mask's seed is drawn from (or a
    BatchRows of one, when x holds rows of a larger batch).
    mask: optional precomputed keep-mask (bool or 0/1, same shape as x) that overrides rng.
    With p == 0 and no mask the layer is the identity (evaluation mode).
    """
    if mask is None:
        if p == 0.0:
            return x, None
        if rng is None:
            raise ValueError("dropout with p > 0 needs an rng (numpy Generator) or a mask")
        mask = keep_mask(rng, x.shape, p)
    scale = mask.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * scale, scale


def dropout_backward(dy, scale):
    """dx = dy * mask / (1 - p): the same elements pass, with the same scale (docs/derivations.md#dropout)"""
    if scale is None:
        return dy
    return dy * scale
