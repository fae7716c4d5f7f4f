"""Causal attention, forward and backward, two ways.

NumPy reference: numgpt/layers/attention.py (attention_forward / attention_backward).
Derivation: docs/derivations.md#attention

1. Stored probabilities (softmax_causal_fwd / softmax_causal_bwd): kernels/ops.py computes the
   per-head products (q k^T, P v, and the four of the backward) with NumPy's batched matmul,
   i.e. BLAS, and these kernels do everything between them: the causal softmax with its
   log-sum-exp and the dropout mask, and in the backward ds = p (dp - D). BLAS computes part
   of the masked upper half too (the blocks on the diagonal, kernels/ops._causal_bmm), but
   BLAS runs far faster than the loops below, so this wins wherever the T x T probabilities
   of a layer are cheap to keep (kernels/ops.STORE_PROBS_BYTES).
2. Fused, flash-attention style (attention_fwd / attention_bwd): for long blocks and big
   batches, where storing P for every layer would cost too much memory.

The fused kernels read q, k and v straight out of the packed projection qkv [B, T, 3C] (q in columns
0:C, k in C:2C, v in 2C:3C; head h owns columns h*hs:(h+1)*hs of each), write the merged heads
[B, T, C], compute only the causal half (j <= i), and never store the T x T probabilities: the
forward keeps one log-sum-exp per row, and the backward recomputes p_ij = exp(s_ij - lse_i).
Both are parallel over (batch, head): every (b, h) copies its q, k, v into small contiguous
buffers (k and v also transposed, so the inner loops run over contiguous memory and vectorise)
and owns its own slices of the outputs, so there are no races.
"""
import math

import numpy as np
from numba import prange

from ._jit import fast_exp, jit


@jit()
def _load_head(qkv, b, h, n_head):
    """Head h of sequence b copied out of qkv: Q, K, V [T, hs] and KT, VT [hs, T]."""
    T = qkv.shape[1]
    C = qkv.shape[2] // 3
    hs = C // n_head
    dt = qkv.dtype
    Q = np.empty((T, hs), dtype=dt)
    K = np.empty((T, hs), dtype=dt)
    V = np.empty((T, hs), dtype=dt)
    KT = np.empty((hs, T), dtype=dt)
    VT = np.empty((hs, T), dtype=dt)
    o = h * hs
    for t in range(T):
        row = qkv[b, t]
        # slices, indexed by the loop variable alone (see _jit.py, "Index with loop variables")
        q, k, v = row[o:o + hs], row[C + o:C + o + hs], row[2 * C + o:2 * C + o + hs]
        for d in range(hs):
            Q[t, d] = q[d]
            K[t, d] = k[d]
            V[t, d] = v[d]
    for t in range(T):
        for d in range(hs):
            KT[d, t] = K[t, d]
            VT[d, t] = V[t, d]
    return Q, K, V, KT, VT


@jit(parallel=True)
def attention_fwd(qkv, n_head, scale, keep, inv_keep, has_drop, y, lse):
    """qkv [B, T, 3C] -> y [B, T, C] (attention output, heads merged), lse [B, H, T].

    keep [B, H, T, T] bool is the dropout keep-mask on the probabilities (used when has_drop).
    scale and inv_keep come in the dtype of qkv, so float32 sums stay float32 (and vectorise).
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    dt = y.dtype
    zero = dt.type(0)  # typed 0 (np.zeros(1)[0] would be a parallel loop of its own)
    for bh in prange(B * n_head):
        b = bh // n_head
        h = bh % n_head
        Q, K, V, KT, VT = _load_head(qkv, b, h, n_head)
        s = np.empty(T, dtype=dt)
        acc = np.empty(hs, dtype=dt)
        for i in range(T):
            n = i + 1
            s[:n] = 0
            for d in range(hs):          # s_j = scale * q_i . k_j, for j <= i only
                qd = Q[i, d] * scale
                for j in range(n):
                    s[j] += qd * KT[d, j]
            m = s[0]
            for j in range(1, n):
                m = max(m, s[j])
            tot = zero
            for j in range(n):
                e = fast_exp(s[j] - m)
                s[j] = e
                tot += e
            inv = 1 / tot
            acc[:] = 0
            for j in range(n):           # y_i = sum_j dropout(p_ij) v_j
                pj = s[j] * inv
                if has_drop:
                    pj = pj * inv_keep if keep[b, h, i, j] else zero
                for d in range(hs):
                    acc[d] += pj * V[j, d]
            y[b, i, h * hs:(h + 1) * hs] = acc
            lse[b, h, i] = m + math.log(tot)


@jit(parallel=True)
def attention_bwd(qkv, y, dy, lse, n_head, scale, keep, inv_keep, has_drop, dqkv):
    """Gradient of the attention: dy [B, T, C] -> dqkv [B, T, 3C] (fully overwritten).

    For each row i:  D_i = dy_i . y_i  (= sum_j p_ij dp_ij), and for j <= i
      p_ij = exp(scale q_i.k_j - lse_i),  dpd_ij = dy_i . v_j,  dp_ij = dpd_ij * mask_ij / (1 - p)
      dv_j += pd_ij dy_i,  ds_ij = p_ij (dp_ij - D_i),  dq_i += scale ds_ij k_j,  dk_j += scale ds_ij q_i
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    dt = y.dtype
    zero = dt.type(0)  # typed 0 (np.zeros(1)[0] would be a parallel loop of its own)
    for bh in prange(B * n_head):
        b = bh // n_head
        h = bh % n_head
        Q, K, V, KT, VT = _load_head(qkv, b, h, n_head)
        dQ = np.zeros((T, hs), dtype=dt)
        dK = np.zeros((T, hs), dtype=dt)
        dV = np.zeros((T, hs), dtype=dt)
        s = np.empty(T, dtype=dt)
        dpd = np.empty(T, dtype=dt)
        dyi = np.empty(hs, dtype=dt)
        for i in range(T):
            n = i + 1
            dyi[:] = dy[b, i, h * hs:(h + 1) * hs]
            yi = y[b, i, h * hs:(h + 1) * hs]
            Di = zero
            for d in range(hs):
                Di += dyi[d] * yi[d]
            s[:n] = 0
            dpd[:n] = 0
            for d in range(hs):
                qd = Q[i, d] * scale
                gd = dyi[d]
                for j in range(n):
                    s[j] += qd * KT[d, j]
                    dpd[j] += gd * VT[d, j]
            L = lse[b, h, i]
            for j in range(n):
                p = math.exp(s[j] - L)     # the forward's softmax, recomputed (one at a time: libm)
                pd = p
                dp = dpd[j]
                if has_drop:
                    if keep[b, h, i, j]:
                        pd = p * inv_keep
                        dp = dp * inv_keep
                    else:
                        pd = zero
                        dp = zero
                ds = p * (dp - Di) * scale
                for d in range(hs):
                    dV[j, d] += pd * dyi[d]
                    dQ[i, d] += ds * K[j, d]
                    dK[j, d] += ds * Q[i, d]
        o = h * hs
        for t in range(T):
            row = dqkv[b, t]
            row[o:o + hs] = dQ[t]
            row[C + o:C + o + hs] = dK[t]
            row[2 * C + o:2 * C + o + hs] = dV[t]


# ---- the stored-probabilities path: the softmax between BLAS's products ----

@jit(parallel=True)
def softmax_causal_fwd(S, scale, keep, inv_keep, has_drop, P, Pd, lse):
    """S [B, H, T, T] = q k^T (unscaled) -> P = causal softmax of scale * S (zeros above the
    diagonal), Pd = P with dropout applied (written only when has_drop), lse [B, H, T]. P may be S.

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
            lse[b, h, i] = m + math.log(tot)


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
