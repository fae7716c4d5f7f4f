"""Fused causal attention, forward and backward, flash-attention style.

NumPy reference: numgpt/layers/attention.py (attention_forward / attention_backward).
Derivation: docs/derivations.md#attention

The kernels read q, k and v straight out of the packed projection qkv [B, T, 3C] (q in columns
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

from ._jit import jit


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
    for t in range(T):
        for d in range(hs):
            Q[t, d] = qkv[b, t, h * hs + d]
            K[t, d] = qkv[b, t, C + h * hs + d]
            V[t, d] = qkv[b, t, 2 * C + h * hs + d]
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
    zero = np.zeros(1, dtype=dt)[0]  # typed 0 (never from an uninitialised buffer)
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
                e = math.exp(s[j] - m)
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
            for d in range(hs):
                y[b, i, h * hs + d] = acc[d]
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
    zero = np.zeros(1, dtype=dt)[0]  # typed 0 (never from an uninitialised buffer)
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
            Di = zero
            for d in range(hs):
                dyi[d] = dy[b, i, h * hs + d]
                Di += dyi[d] * y[b, i, h * hs + d]
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
                p = math.exp(s[j] - L)     # the forward's softmax, recomputed
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
        for t in range(T):
            for d in range(hs):
                dqkv[b, t, h * hs + d] = dQ[t, d]
                dqkv[b, t, C + h * hs + d] = dK[t, d]
                dqkv[b, t, 2 * C + h * hs + d] = dV[t, d]
