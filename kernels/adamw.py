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
