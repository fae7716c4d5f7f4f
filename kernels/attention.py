"""Causal attention's softmax, forward and backward, between BLAS's products.

NumPy reference: numgpt/layers/attention.py (attention_forward / attention_backward).
Derivation: docs/derivations.md#attention

kernels/ops.py computes the per-head products (q k^T, P v, and the four of the backward) with
NumPy's batched matmul, i.e. BLAS, and these kernels do everything between them: the causal
softmax and the dropout mask (softmax_causal_fwd), and in the backward
ds = p (dp - D) (softmax_causal_bwd). BLAS computes part of the masked upper half too (the
blocks on the diagonal, kernels/ops._causal_bmm), but runs far faster than loops over the
causal half would. Where a layer's T x T probabilities are cheap to keep
(kernels/ops.STORE_PROBS_BYTES) they are kept for the backward; above that the backward
computes them again, a chunk of sequences at a time, with the same products and the same
softmax kernel, so that the memory stays linear in the batch.
"""

import numpy as np
from numba import prange

from ._jit import fast_exp, jit


@jit(parallel=True)
def softmax_causal_fwd(S, scale, keep, inv_keep, has_drop, P, Pd):
    """S [B, H, T, T] = q k^T (unscaled) -> P = causal softmax of scale * S (zeros above the
    diagonal): P_ij = exp(scale S_ij - m_i) / sum_j' exp(scale S_ij' - m_i) over j, j' <= i, m_i
    the row's maximum; Pd = P * keep / (1 - p), dropout applied (written only when has_drop).
    P may be S.

    Each row of S is read from a copy: where P is S (the callers work in place), a loop that
    reads S's row and writes P's does not vectorise, because LLVM's run-time check that the
    two do not overlap fails; with the copy it does."""
    B, H, T, _ = S.shape
    zero = P.dtype.type(0)
    one = P.dtype.type(1)  # typed: 1 / tot stays in P's dtype
    for bh in prange(B * H):
        b = bh // H
        h = bh % H
        s = np.empty(T, dtype=P.dtype)
        for i in range(T):
            n = i + 1
            Si, Pi = S[b, h, i], P[b, h, i]  # row slices: _jit.py, "Index with loop variables"
            for j in range(n):  # a loop, not s[:n] = ...: in a parallel function that is a
                s[j] = Si[j]    # parallel loop of its own (docs/kernels.md)
            m = s[0] * scale
            for j in range(1, n):
                m = max(m, s[j] * scale)
            tot = zero
            for j in range(n):
                e = fast_exp(s[j] * scale - m)
                Pi[j] = e
                tot += e
            inv = one / tot
            for j in range(n):
                Pi[j] *= inv
            for j in range(n, T):
                Pi[j] = zero
            if has_drop:
                Pdi, ki = Pd[b, h, i], keep[b, h, i]
                for j in range(n):  # branch-free, so that it vectorises
                    Pdi[j] = Pi[j] * (inv_keep * ki[j])
                for j in range(n, T):
                    Pdi[j] = zero


@jit(parallel=True)
def softmax_causal_bwd(P, dPd, dy, y, scale, keep, inv_keep, has_drop, Pd, dS):
    """dPd = dy v^T [B, H, T, T] -> dS = scale * p (dp - D) (zeros above the diagonal), where
    dp = dPd (times the dropout mask / (1 - p) when has_drop) and D_i = dy_i . y_i for the head;
    with dropout, also Pd = P with the mask applied again (for dv = Pd^T dy). dS may be dPd."""
    B, H, T, _ = P.shape
    hs = y.shape[2] // H
    zero = P.dtype.type(0)
    for r in prange(B * H * T):
        b = r // (H * T)
        h = (r // T) % H
        i = r % T
        n = i + 1
        dyi = dy[b, i, h * hs:(h + 1) * hs]  # slices: see _jit.py, "Index with loop variables"
        yi = y[b, i, h * hs:(h + 1) * hs]
        D = zero
        for d in range(hs):
            D += dyi[d] * yi[d]
        Pi, dPi, dSi = P[b, h, i], dPd[b, h, i], dS[b, h, i]
        if has_drop:
            Pdi, ki = Pd[b, h, i], keep[b, h, i]
            for j in range(n):  # branch-free, so that it vectorises
                kj = inv_keep * ki[j]
                Pdi[j] = Pi[j] * kj
                dSi[j] = Pi[j] * (dPi[j] * kj - D) * scale
            for j in range(n, T):
                Pdi[j] = zero
        else:
            for j in range(n):
                dSi[j] = Pi[j] * (dPi[j] - D) * scale
        for j in range(n, T):
            dSi[j] = zero
