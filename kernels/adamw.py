"""AdamW update of one parameter tensor in a single pass over memory.

NumPy reference: numgpt/optim.py (AdamW.step). Derivation: docs/derivations.md#adamw

The divisions in the loop vectorise only under NumPy's error model (kernels/_jit.OPTIONS): with
Python's, every divisor is tested for zero and the update ran 4.5x slower.
"""
import math

from numba import prange

from ._jit import jit


@jit(parallel=True)
def adamw_update(p, g, m, v, lr, b1, b2, eps, decay, c1, c2):
    """In place on flat arrays: p *= decay; m, v moments; p -= lr (m / c1) / (sqrt(v / c2) + eps)."""
    for i in prange(p.size):
        gi = g[i]
        mi = b1 * m[i] + (1 - b1) * gi
        vi = b2 * v[i] + (1 - b2) * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - lr * (mi / c1) / (math.sqrt(vi / c2) + eps)


_adamw_serial = adamw_update.serial


@jit()
def adamw_update_lists(P, G, M, V, decays, lr, b1, b2, eps, weight_decay, c1, c2):
    """adamw_update over every tensor of typed lists of flat arrays in one call (small models:
    one call per tensor cost more than the update); decays[k] says whether tensor k decays."""
    for k in range(len(P)):
        decay = 1 - lr * weight_decay if decays[k] else 1.0
        _adamw_serial(P[k], G[k], M[k], V[k], lr, b1, b2, eps, decay, c1, c2)


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
