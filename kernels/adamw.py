"""AdamW update of one parameter tensor in a single pass over memory.

NumPy reference: numgpt/optim.py (AdamW.step). Derivation: docs/derivations.md#adamw

The divisions in the loop vectorise only under NumPy's error model (kernels/_jit.OPTIONS): with
Python's, every divisor is tested for zero, and that branch stops the loop vectorising
(docs/kernels.md).
"""
import math

import numpy as np

from numba import prange

from ._jit import jit


@jit(parallel=True)
def adamw_update(p, g, m, v, lr, b1, b2, eps, decay, c1, c2):
    """In place on flat arrays: p *= decay; m, v moments; p -= lr (m / c1) / (sqrt(v / c2) + eps),
    computed as (lr / c1) m / (sqrt(v) / sqrt(c2) + eps): one division and one square root per
    element instead of three divisions (their throughput bounds this loop)."""
    k = np.empty(8, dtype=p.dtype)  # the constants in p's dtype: float32 stays float32
    k[0], k[1], k[2], k[3] = b1, 1 - b1, b2, 1 - b2
    k[4], k[5], k[6], k[7] = lr / c1, 1 / math.sqrt(c2), eps, decay
    kb1, k1b1, kb2, k1b2, step, rc2, keps, kdecay = k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]
    for i in prange(p.size):
        gi = g[i]
        mi = kb1 * m[i] + k1b1 * gi
        vi = kb2 * v[i] + k1b2 * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * kdecay - step * mi / (math.sqrt(vi) * rc2 + keps)


_adamw_serial = adamw_update.serial


@jit()
def adamw_update_lists(P, G, M, V, decays, lr, b1, b2, eps, weight_decay, c1, c2):
    """adamw_update over every tensor of typed lists of flat arrays in one call (small models:
    one call per tensor cost more than the update); decays[k] says whether tensor k decays."""
    for i in range(len(P)):
        decay = 1 - lr * weight_decay if decays[i] else 1.0
        _adamw_serial(P[i], G[i], M[i], V[i], lr, b1, b2, eps, decay, c1, c2)


@jit()
def sum_squares_lists(G):
    """sum of g * g over every array of a typed list (float64), for the global gradient norm."""
    tot = 0.0
    for k in range(len(G)):
        g = G[k]
        for i in range(g.size):
            tot += float(g[i]) * float(g[i])
    return tot


@jit()
def scale_lists(G, s):
    """g *= s for every array of a typed list."""
    for k in range(len(G)):
        g = G[k]
        for i in range(g.size):
            g[i] *= s
