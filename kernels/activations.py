"""Bias add fused with the activation (ReLU or GELU), forward and backward.

NumPy reference: numgpt/layers/activations.py and numgpt/layers/linear.py (the bias).
Derivation: docs/derivations.md#relu, docs/derivations.md#gelu
Activation codes: 0 = ReLU, 1 = GELU (tanh form).
"""
import math

import numpy as np
from numba import prange

from ._jit import jit

GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


@jit(parallel=True)
def bias_act_fwd(h, b, act, a):
    """h [N, F] (x W without bias) gets the bias added in place (the pre-activation, kept for the
    backward); a [N, F] = act(h + b)."""
    N, F = h.shape
    zero = np.zeros(1, dtype=a.dtype)[0]  # typed 0 (never from an uninitialised output)
    for n in prange(N):
        for f in range(F):
            z = h[n, f] + b[f]
            h[n, f] = z
            if act == 0:
                a[n, f] = z if z > zero else zero
            else:
                t = math.tanh(GELU_C * (z + GELU_A * z * z * z))
                a[n, f] = 0.5 * z * (1 + t)


@jit(parallel=True)
def bias_act_bwd(da, h, act, n_chunks, dh, db_part):
    """da [N, F] -> dh [N, F] = da * act'(h); db_part [n_chunks, F] partial row sums of dh."""
    N, F = h.shape
    zero = np.zeros(1, dtype=dh.dtype)[0]
    per = (N + n_chunks - 1) // n_chunks
    for k in prange(n_chunks):
        for f in range(F):
            db_part[k, f] = zero
        for n in range(k * per, min(N, (k + 1) * per)):
            for f in range(F):
                z = h[n, f]
                if act == 0:
                    d = da[n, f] if z > zero else zero
                else:
                    t = math.tanh(GELU_C * (z + GELU_A * z * z * z))
                    d = da[n, f] * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * GELU_C
                                    * (1 + 3 * GELU_A * z * z))
                dh[n, f] = d
                db_part[k, f] += d
