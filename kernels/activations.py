"""Bias add fused with the activation (ReLU or GELU), forward and backward.

NumPy reference: numgpt/layers/activations.py and numgpt/layers/linear.py (the bias).
Derivation: docs/derivations.md#relu, docs/derivations.md#gelu
Activation codes: numgpt.arch's ACT_RELU and ACT_GELU (tanh form).
"""
import math

import numpy as np
from numba import prange

from numgpt.arch import ACT_RELU

from ._jit import fast_exp, jit

GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


@jit()
def gelu_consts(dtype_of):
    """GELU_C, GELU_A, 1/2, 1 and 2 in the dtype of the array dtype_of: float32 arithmetic stays
    float32 (a Python float constant would turn it into float64, and libm's double tanh)."""
    k = np.empty(5, dtype=dtype_of.dtype)
    k[0] = GELU_C
    k[1] = GELU_A
    k[2] = 0.5
    k[3] = 1
    k[4] = 2
    return k[0], k[1], k[2], k[3], k[4]


@jit()
def tanh_by_exp(u, one, two):
    """tanh(u) = 1 - 2 / (exp(2u) + 1), one exponential: cheaper than math.tanh, as accurate for
    GELU, and exact at the ends (a huge exp gives 1, a tiny one -1; never inf / inf). In float32
    the exp is _jit.fast_exp, which vectorises."""
    return one - two / (fast_exp(u + u) + one)


@jit(parallel=True)
def bias_act_fwd(h, b, act, a):
    """h [N, F] (x W without bias) gets the bias added in place (the pre-activation, kept for the
    backward); a [N, F] = act(h + b)."""
    N, F = h.shape
    zero = a.dtype.type(0)  # typed 0 (np.zeros(1)[0] would be a parallel loop of its own)
    c, A, half, one, two = gelu_consts(a)
    for n in prange(N):
        for f in range(F):
            z = h[n, f] + b[f]
            h[n, f] = z
            if act == ACT_RELU:
                a[n, f] = z if z > zero else zero * z  # as the reference's x * (x > 0): a NaN stays NaN
            else:
                t = tanh_by_exp(c * (z + A * z * z * z), one, two)
                a[n, f] = half * z * (one + t)


@jit(parallel=True)
def bias_act_bwd(da, h, act, n_chunks, dh, db_part):
    """da [N, F] -> dh [N, F] = da * act'(h); db_part [n_chunks, F] partial row sums of dh."""
    N, F = h.shape
    zero = dh.dtype.type(0)
    c, A, half, one, two = gelu_consts(dh)
    three = one + two
    per = (N + n_chunks - 1) // n_chunks
    for k in prange(n_chunks):
        for f in range(F):
            db_part[k, f] = zero
        for n in range(k * per, min(N, (k + 1) * per)):
            for f in range(F):
                z = h[n, f]
                if act == ACT_RELU:
                    d = da[n, f] if z > zero else zero
                else:
                    t = tanh_by_exp(c * (z + A * z * z * z), one, two)
                    d = da[n, f] * (half * (one + t) + half * z * (one - t * t) * c
                                    * (one + three * A * z * z))
                dh[n, f] = d
                db_part[k, f] += d
