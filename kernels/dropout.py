"""Dropout masks drawn on all cores, the same bits as the NumPy reference.

NumPy reference: numgpt/layers/dropout.py (keep_mask, dropout_forward), whose notes give the
hash: element i is kept when splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15) >> 32 >= p * 2^32.
Each element's bits depend only on the seed and its position, so the mask can be cut in pieces
and drawn on every core, and the loops vectorise (64-bit multiplies and shifts).
Tests: tests/test_kernels.py holds the masks equal to the reference's, bit for bit.
"""
import numpy as np
from numba import prange

from numgpt.layers.dropout import GOLDEN, MIX1, MIX2, draw_seed, keep_threshold

from ._jit import jit, pick

PARTS = 64  # pieces a mask is cut into for the threads


@jit()
def _hash_bits(seed, i):
    """The top 32 bits of splitmix64(seed + (i + 1) * GOLDEN), as uint64; i: uint64."""
    z = seed + (i + np.uint64(1)) * GOLDEN
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    z = z ^ (z >> np.uint64(31))
    return z >> np.uint64(32)


@jit(parallel=True)
def keep_fill(seed, thr, keep):
    """keep [n] bool: keep[i] = the hash of (seed, i) >= thr."""
    seed, thr = np.uint64(seed), np.uint64(thr)  # a plain int would compile as int64: other bits
    n = keep.size
    per = (n + PARTS - 1) // PARTS
    for k in prange(PARTS):
        a = min(n, k * per)
        part = keep[a:min(n, a + per)]  # a slice, indexed by the loop variable (see _jit.py)
        base = np.uint64(a)
        for i in range(part.size):
            part[i] = _hash_bits(seed, base + np.uint64(i)) >= thr


@jit(parallel=True)
def dropout_fill(x, seed, thr, inv, y):
    """x, y [n]: y[i] = x[i] * inv where the hash of (seed, i) >= thr, else 0. The forward pass
    applies the mask with it, and the backward pass applies the same mask again from the seed."""
    seed, thr = np.uint64(seed), np.uint64(thr)  # a plain int would compile as int64: other bits
    n = x.size
    per = (n + PARTS - 1) // PARTS
    zero = inv - inv  # typed 0 (np.zeros here would be a parallel loop of its own)
    for k in prange(PARTS):
        a = min(n, k * per)
        b = min(n, a + per)
        xs, ys = x[a:b], y[a:b]
        base = np.uint64(a)
        for i in range(xs.size):
            ys[i] = xs[i] * (inv if _hash_bits(seed, base + np.uint64(i)) >= thr else zero)


def keep_mask(rng, shape, p):
    """As numgpt.layers.dropout.keep_mask (the same mask from the same rng state), on the cores."""
    keep = np.empty(shape, dtype=bool)
    pick(keep_fill, keep.size)(draw_seed(rng, shape), keep_threshold(p), keep.reshape(-1))
    return keep


def _apply(x, seed, thr, inv):
    x = np.require(x, requirements="C")  # (keeps a 0-d x 0-d)
    y = np.empty_like(x)
    pick(dropout_fill, x.size)(x.reshape(-1), seed, thr, inv, y.reshape(-1))
    return y


def dropout_forward(x, p, rng=None):
    """As numgpt.layers.dropout.dropout_forward (without its mask argument), in one pass over x,
    but the cache is (seed, threshold, 1 / (1 - p)) instead of the scaled mask: dropout_backward
    draws the mask again. For the scaled model at batch 64 stored masks would be 300 MB of the
    step's peak memory (two [B, T, C] float32 arrays a block)."""
    if p == 0.0:
        return x, None
    if rng is None:
        raise ValueError("dropout with p > 0 needs an rng (numpy Generator)")
    seed, thr, inv = draw_seed(rng, x.shape), keep_threshold(p), x.dtype.type(1.0 / (1.0 - p))
    return _apply(x, seed, thr, inv), (seed, thr, inv)


def dropout_backward(dy, cache):
    """dx = dy * mask / (1 - p), the mask drawn again from the forward's seed."""
    if cache is None:
        return dy
    return _apply(dy, *cache)
