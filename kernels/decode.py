"""One token of generation through the whole model in one compiled call (key/value cache).

Sampling one token at a time is a chain of small matrix-vector products, a softmax over the
cached positions and a few LayerNorms per block. Done as NumPy calls, a small model spends most
of each token in Python and call overhead (the laptop model: ~60 calls per token, 3 MB of
weights); done here, the token is one call. For a big model the matrix-vector products read
every weight once per token, so they are memory-bound; their columns are then split over the
threads (`_mv_par`'s prange) to use both cores' bandwidth.

decode_step computes exactly what model.forward(ids, kv=cache) computes for one new position,
with the blocks' parameters stacked along a leading layer axis (see numgpt.generate.KVCache);
tests/test_kernels.py holds the two equal.
"""
import math

import numba
import numpy as np
from numba import prange

from ._jit import FASTMATH

PARTS = 2  # column blocks of a parallel matrix-vector product (one per core here)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _mv_cols(x, W, bias, y, j0, j1):
    """y[j0:j1] = x @ W[:, j0:j1] + bias[j0:j1] for one row x [n]: W is streamed row by row, four
    rows per sweep, so y stays in L1 and the inner loop is a vectorised multiply-add."""
    n = W.shape[0]
    for j in range(j0, j1):
        y[j] = bias[j] if bias.size else 0
    i = 0
    while i + 4 <= n:
        x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        W0, W1, W2, W3 = W[i], W[i + 1], W[i + 2], W[i + 3]
        for j in range(j0, j1):
            y[j] += x0 * W0[j] + x1 * W1[j] + x2 * W2[j] + x3 * W3[j]
        i += 4
    while i < n:
        xi, Wi = x[i], W[i]
        for j in range(j0, j1):
            y[j] += xi * Wi[j]
        i += 1


def _mv_body(x, W, bias, y):
    """y[b] = x[b] @ W + bias (bias may be empty) for every row b, W [n, m] row-major; the
    columns are cut into PARTS blocks, one per prange task."""
    B = x.shape[0]
    m = W.shape[1]
    step = (m + PARTS - 1) // PARTS
    for c in prange(PARTS):
        j0 = c * step
        j1 = min(m, j0 + step)
        for b in range(B):
            _mv_cols(x[b], W, bias, y[b], j0, j1)


_mv_par = numba.njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH)(_mv_body)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _mv(x, W, bias, y, par):
    if par:
        _mv_par(x, W, bias, y)
    else:
        for b in range(x.shape[0]):
            _mv_cols(x[b], W, bias, y[b], 0, W.shape[1])


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _layernorm(x, g, b, out):
    """LayerNorm of each row of x [B, C] into out (two passes: mean, then centred variance)."""
    B, C = x.shape
    for r in range(B):
        mu = x[r].sum() / C
        var = x.dtype.type(0)
        for c in range(C):
            d = x[r, c] - mu
            var += d * d
        rs = 1 / math.sqrt(var / C + 1e-5)
        for c in range(C):
            out[r, c] = (x[r, c] - mu) * rs * g[c] + b[c]


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def decode_step(ids, t, tok_emb, pos_emb, ln1_g, ln1_b, w_qkv, w_proj, b_proj, ln2_g, ln2_b,
                w_fc, b_fc, w_out, b_out, lnf_g, lnf_b, w_head, b_head, K, V, n_head, norm,
                residual, gelu, par, logits):
    """Logits [B, V] of the next token after ids [B] placed at position t; fills K, V at t.

    K, V: [L, B, H, block, hs] caches (positions < t filled). norm: 0 none, 1 post, 2 pre.
    Absent parts have size 0: w_proj (no output projection), w_fc (no feed-forward), w_out
    (feed-forward without its second linear).
    """
    B = ids.shape[0]
    L = w_qkv.shape[0]
    C = tok_emb.shape[1]
    hs = C // n_head
    dt = tok_emb.dtype.type
    scale = dt(1 / math.sqrt(hs))
    x = np.empty((B, C), tok_emb.dtype)
    h = np.empty((B, C), tok_emb.dtype)
    y = np.empty((B, C), tok_emb.dtype)
    qkv = np.empty((B, 3 * C), tok_emb.dtype)
    F = w_fc.shape[2]
    f = np.empty((B, F), tok_emb.dtype)
    s = np.empty(t + 1, tok_emb.dtype)
    for b in range(B):
        for c in range(C):
            x[b, c] = tok_emb[ids[b], c] + pos_emb[t, c]
    for layer in range(L):
        # ---- attention sublayer ----
        if norm == 2:
            _layernorm(x, ln1_g[layer], ln1_b[layer], h)
        else:
            h[:] = x
        _mv(h, w_qkv[layer], w_qkv[layer, 0, :0], qkv, par)
        for b in range(B):
            for hd in range(n_head):
                o = hd * hs
                for d in range(hs):
                    K[layer, b, hd, t, d] = qkv[b, C + o + d]
                    V[layer, b, hd, t, d] = qkv[b, 2 * C + o + d]
                mx = dt(-np.inf)
                for p in range(t + 1):
                    acc = dt(0)
                    for d in range(hs):
                        acc += qkv[b, o + d] * K[layer, b, hd, p, d]
                    acc *= scale
                    s[p] = acc
                    mx = max(mx, acc)
                tot = dt(0)
                for p in range(t + 1):
                    e = math.exp(s[p] - mx)
                    s[p] = e
                    tot += e
                for d in range(hs):
                    y[b, o + d] = 0
                for p in range(t + 1):
                    w = s[p] / tot
                    for d in range(hs):
                        y[b, o + d] += w * V[layer, b, hd, p, d]
        if w_proj.shape[1] > 0:
            h[:] = y
            _mv(h, w_proj[layer], b_proj[layer], y, par)
        if residual:
            x += y
        else:
            x[:] = y
        if norm == 1:
            h[:] = x
            _layernorm(h, ln1_g[layer], ln1_b[layer], x)
        # ---- feed-forward sublayer ----
        if F > 0:
            if norm == 2:
                _layernorm(x, ln2_g[layer], ln2_b[layer], h)
            else:
                h[:] = x
            _mv(h, w_fc[layer], b_fc[layer], f, par)
            for b in range(B):
                for j in range(F):
                    v = f[b, j]
                    if gelu:
                        f[b, j] = 0.5 * v * (1 + math.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
                    else:
                        f[b, j] = max(v, dt(0))
            if w_out.shape[1] > 0:
                _mv(f, w_out[layer], b_out[layer], y, par)
            else:
                y[:] = f
            if residual:
                x += y
            else:
                x[:] = y
            if norm == 1:
                h[:] = x
                _layernorm(h, ln2_g[layer], ln2_b[layer], x)
    if norm != 0:
        h[:] = x
        _layernorm(h, lnf_g, lnf_b, x)
    _mv(x, w_head, b_head, logits, par)
