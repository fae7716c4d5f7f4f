"""One token of generation through the whole model in one compiled call (key/value cache).

Sampling one token at a time is a chain of small matrix-vector products, a softmax over the
cached positions and a few LayerNorms per block. Done as NumPy calls, a small model spends most
of each token in Python and call overhead (the laptop model: ~60 calls per token, 3 MB of
weights); done here, the token is one call. For a big model the matrix-vector products read
every weight once per token, so they are memory-bound; see _mv for the layout that streams them
fastest.

decode_step computes exactly what model.forward(ids, kv=cache) computes for one new position,
with the blocks' parameters stacked along a leading layer axis (see numgpt.generate.KVCache);
tests/test_kernels.py holds the two equal.
"""
import math

import numba
import numpy as np

from ._jit import OPTIONS
from .activations import gelu_consts, tanh_by_exp
from .layernorm import layernorm_fwd

@numba.njit(**OPTIONS)
def _dot_rows(xb, W, bias, yb, j0, j1):
    """yb[j] = W[j] . xb + bias[j] for j0 <= j < j1 (W as W.T [out, in]; bias may be empty)."""
    n = W.shape[1]
    for j in range(j0, j1):
        row = W[j]
        acc = bias[j] if bias.size else row[0] * 0
        for i in range(n):
            acc += row[i] * xb[i]
        yb[j] = acc


ROW_PARTS = 8  # pieces the rows of a big matrix are dealt out in (to numba's threads)


@numba.njit(parallel=True, **OPTIONS)
def _dot_rows_threads(xb, W, bias, yb):
    """_dot_rows over all rows, in ROW_PARTS pieces on numba's threads (each output is still one
    thread's dot product, so the result is the same bit for bit)."""
    m = W.shape[0]
    per = (m + ROW_PARTS - 1) // ROW_PARTS
    for p in numba.prange(ROW_PARTS):
        _dot_rows(xb, W, bias, yb, p * per, min(m, (p + 1) * per))


@numba.njit(**OPTIONS)
def _mv(x, W, bias, y, layout):
    """y[b] = x[b] @ W + bias (bias may be empty) for every row b, in one of three layouts.

    layout 1 or 2 (big models, W given as W.T [out, in]): each output is a dot product over one
    contiguous row, so the weights stream through memory once, front to back; 2 deals the rows
    out to numba's threads. Measured here on the scaled preset's 24 matrices (42.5 MB): 28 GB/s
    on one core; 68 GB/s on two threads (2.4x: a single core's outstanding loads do not fill the
    memory bandwidth; the threads spin between the calls, so waking them is cheap); the
    row-by-row form below streams 16 GB/s, and NumPy's BLAS on two threads 21 GB/s.
    layout 0 (small models, W [in, out] in L2): y += x_i W_i, four rows i per sweep, a
    vectorised multiply-add over contiguous outputs; for the laptop model's 128-wide layers this
    beats the dot products, whose short sums end in a horizontal add each.
    """
    B = x.shape[0]
    for b in range(B):
        xb = x[b]
        yb = y[b]
        if layout == 2:
            _dot_rows_threads(xb, W, bias, yb)
        elif layout == 1:
            _dot_rows(xb, W, bias, yb, 0, W.shape[0])
        else:
            n, m = W.shape
            for j in range(m):
                yb[j] = bias[j] if bias.size else W[0, 0] * 0
            i = 0
            while i + 4 <= n:
                x0, x1, x2, x3 = xb[i], xb[i + 1], xb[i + 2], xb[i + 3]
                W0, W1, W2, W3 = W[i], W[i + 1], W[i + 2], W[i + 3]
                for j in range(m):
                    yb[j] += x0 * W0[j] + x1 * W1[j] + x2 * W2[j] + x3 * W3[j]
                i += 4
            while i < n:
                xi, Wi = xb[i], W[i]
                for j in range(m):
                    yb[j] += xi * Wi[j]
                i += 1


_layernorm_rows = layernorm_fwd.serial  # the training kernel's forward, on the calling thread


@numba.njit(**OPTIONS)
def _layernorm(x, g, b, out):
    """LayerNorm of each row of x [B, C] into out, by kernels/layernorm.py's forward."""
    stats = np.empty((2, x.shape[0]), x.dtype)  # mean and 1/std, not needed here
    _layernorm_rows(x, g, b, x.dtype.type(1e-5), out, stats[0], stats[1])


@numba.njit(**OPTIONS)
def _merge(x, y, h, residual, norm, g, b):
    """A sublayer's output y into the stream x: x + y (residual) or y, then LayerNorm (post-norm);
    h is scratch."""
    if residual:
        x += y
    else:
        x[:] = y
    if norm == 1:
        h[:] = x
        _layernorm(h, g, b, x)


@numba.njit(**OPTIONS)
def decode_step(ids, t, tok_emb, pos_emb, ln1_g, ln1_b, w_qkv, w_proj, b_proj, ln2_g, ln2_b,
                w_fc, b_fc, w_out, b_out, lnf_g, lnf_b, w_head, b_head, K, V, n_head, norm,
                residual, gelu, tr, logits):
    """Logits [B, V] of the next token after ids [B] placed at position t; fills K, V at t.

    K, V: [L, B, H, block, hs] caches (positions < t filled). norm: 0 none, 1 post, 2 pre.
    tr: the layout of the weights (see _mv): 1 or 2, transposed ([L, out, in], w_head [V, C]),
    2 with the rows on numba's threads; 0, as stored ([L, in, out]). Absent parts have size 0 (as [L, 0, 0], or w_fc with 0 outputs): w_proj (no
    output projection), w_fc (no feed-forward), w_out (feed-forward without its second linear).
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
    F = w_fc.shape[1] if tr else w_fc.shape[2]
    f = np.empty((B, F), tok_emb.dtype)
    s = np.empty(t + 1, tok_emb.dtype)
    gc, ga, g_half, g_one, g_two = gelu_consts(x)  # GELU's constants in the dtype
    for b in range(B):
        for c in range(C):
            x[b, c] = tok_emb[ids[b], c] + pos_emb[t, c]
    for layer in range(L):
        # ---- attention sublayer ----
        if norm == 2:
            _layernorm(x, ln1_g[layer], ln1_b[layer], h)
        else:
            h[:] = x
        _mv(h, w_qkv[layer], w_qkv[layer, 0, :0], qkv, tr)
        for b in range(B):
            for hd in range(n_head):
                o = hd * hs
                q = qkv[b, o:o + hs]
                Kh = K[layer, b, hd]      # [block, hs], rows 0..t used
                Vh = V[layer, b, hd]
                Kh[t] = qkv[b, C + o:C + o + hs]
                Vh[t] = qkv[b, 2 * C + o:2 * C + o + hs]
                n4 = (t + 1) - (t + 1) % 4
                for p in range(0, n4, 4):  # s_p = scale * q . k_p, four positions per sweep of q
                    k0, k1, k2, k3 = Kh[p], Kh[p + 1], Kh[p + 2], Kh[p + 3]
                    a0 = dt(0)
                    a1 = dt(0)
                    a2 = dt(0)
                    a3 = dt(0)
                    for d in range(hs):
                        qd = q[d]
                        a0 += qd * k0[d]
                        a1 += qd * k1[d]
                        a2 += qd * k2[d]
                        a3 += qd * k3[d]
                    s[p], s[p + 1], s[p + 2], s[p + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
                for p in range(n4, t + 1):
                    kp = Kh[p]
                    acc = dt(0)
                    for d in range(hs):
                        acc += q[d] * kp[d]
                    s[p] = acc * scale
                mx = dt(-np.inf)
                for p in range(t + 1):
                    mx = max(mx, s[p])
                tot = dt(0)
                for p in range(t + 1):
                    e = math.exp(s[p] - mx)
                    s[p] = e
                    tot += e
                yh = y[b, o:o + hs]
                yh[:] = 0
                for p in range(t + 1):   # y = sum_p softmax(s)_p v_p
                    w = s[p]
                    vp = Vh[p]
                    for d in range(hs):
                        yh[d] += w * vp[d]
                inv = 1 / tot
                for d in range(hs):
                    yh[d] *= inv
        if w_proj.shape[1] > 0:
            h[:] = y
            _mv(h, w_proj[layer], b_proj[layer], y, tr)
        _merge(x, y, h, residual, norm, ln1_g[layer], ln1_b[layer])
        # ---- feed-forward sublayer ----
        if F > 0:
            if norm == 2:
                _layernorm(x, ln2_g[layer], ln2_b[layer], h)
            else:
                h[:] = x
            _mv(h, w_fc[layer], b_fc[layer], f, tr)
            for b in range(B):
                for j in range(F):
                    v = f[b, j]
                    if gelu:
                        f[b, j] = g_half * v * (g_one + tanh_by_exp(gc * (v + ga * v * v * v), g_one, g_two))
                    else:
                        f[b, j] = max(v, dt(0))
            if w_out.shape[1] > 0:
                _mv(f, w_out[layer], b_out[layer], y, tr)
            else:
                y[:] = f
            _merge(x, y, h, residual, norm, ln2_g[layer], ln2_b[layer])
    if norm != 0:
        h[:] = x
        _layernorm(h, lnf_g, lnf_b, x)
    _mv(x, w_head, b_head, logits, tr)


@numba.njit(cache=True, nogil=True)
def sample_rows(logits, temperature, u, out):
    """out[b] = a token drawn from softmax(logits[b] / temperature) by inverse CDF with the uniform
    u[b] in [0, 1): the same draw as numgpt.generate.sample_from(next_token_probs(...)) without
    top-k / top-p, in float64, shifted by the row maximum so that nothing overflows."""
    B, V = logits.shape
    c = np.empty(V, np.float64)
    for b in range(B):
        mx = -np.inf
        for j in range(V):
            mx = max(mx, np.float64(logits[b, j]))
        tot = 0.0
        for j in range(V):
            tot += math.exp((np.float64(logits[b, j]) - mx) / temperature)
            c[j] = tot
        target = u[b] * tot
        k = 0
        for j in range(V):
            if c[j] <= target:
                k += 1
        out[b] = min(k, V - 1)
