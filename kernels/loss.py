"""Softmax cross-entropy fused with its gradient: one pass over the logits.

NumPy reference: numgpt/layers/loss.py. Derivation: docs/derivations.md#cross-entropy
"""
import math

import numpy as np
from numba import prange

from ._jit import fast_exp, jit


@jit(parallel=True)
def cross_entropy_fwd_bwd(z, t, want_grad, dz):
    """z [N, V] logits, t [N] targets -> per-row losses [N] (float64); when want_grad, also
    dz [N, V] = (softmax(z) - onehot(t)) / N."""
    N, V = z.shape
    losses = np.empty(N, dtype=np.float64)
    for n in prange(N):
        m = z[n, 0]
        for v in range(1, V):
            if z[n, v] > m:
                m = z[n, v]
        tot = 0.0
        if want_grad:  # keep the exponentials in dz, so each is computed once
            for v in range(V):
                e = fast_exp(z[n, v] - m)
                dz[n, v] = e
                tot += e
        else:
            for v in range(V):
                tot += fast_exp(z[n, v] - m)
        lse = m + math.log(tot)
        losses[n] = lse - z[n, t[n]]
        if want_grad:
            inv = 1.0 / (tot * N)
            for v in range(V):
                dz[n, v] *= inv
            dz[n, t[n]] -= 1.0 / N
    return losses
