"""Token + position embedding, forward and backward.

NumPy reference: numgpt/layers/embedding.py. Derivation: docs/derivations.md#embedding
"""
from numba import prange

from ._jit import jit


@jit(parallel=True)
def embed_fwd(idx, W, P, out):
    """out[b, t] = W[idx[b, t]] + P[t]"""
    B, T = idx.shape
    C = W.shape[1]
    for bt in prange(B * T):
        b = bt // T
        t = bt % T
        r = idx[b, t]
        for c in range(C):
            out[b, t, c] = W[r, c] + P[t, c]


@jit(parallel=True)
def embed_bwd(idx, dx, dW, dP):
    """dW (zeroed here) += scatter of dx by token id; dP[t] = sum over the batch of dx[b, t].

    Parallel over channel blocks: every thread owns whole columns of dW and dP, so the scatter of
    repeated ids never races.
    """
    B, T = idx.shape
    C = dx.shape[2]
    n_blocks = (C + 15) // 16
    zero = dx.dtype.type(0)
    for blk in prange(n_blocks):
        c0 = blk * 16
        c1 = min(C, c0 + 16)
        for r in range(dW.shape[0]):
            for c in range(c0, c1):
                dW[r, c] = zero
        for t in range(dP.shape[0]):
            for c in range(c0, c1):
                dP[t, c] = zero
        for b in range(B):
            for t in range(T):
                r = idx[b, t]
                for c in range(c0, c1):
                    dW[r, c] += dx[b, t, c]
                    dP[t, c] += dx[b, t, c]
