"""A whole training step (forward, backward, loss) of a small GPT in one compiled call.

NumPy reference: numgpt/model.py (GPT.loss_and_grads), layer by layer. Derivations: every section
of docs/derivations.md. Tests: tests/test_step.py holds it equal to the reference and runs the
float64 gradient check through it.

Why: a small model's step is a few hundred small operations, and from Python each costs a
call (microseconds) that can be longer than its work: the tiny bench config spent more than half
its step between kernels. Here the batch is split in one piece per core (prange over shards),
and each piece runs the model's whole forward and backward without returning to Python: the
matrix products through BLAS (numba's np.dot, and blas.gemm where the operands are column
slices or transposed; both SciPy's OpenBLAS, one thread per shard), everything between them
through the serial builds of the other kernels of this folder. Each shard writes its own
gradient slots; they are summed at the end.

Parameters come in a numba typed List of 2-D arrays in the order of numgpt.model.param_shapes
(vectors as [1, n] rows); `slots` and `top` say which entry is which. Dropout is not done
here: a model with dropout trains on the layer-by-layer path.
"""
import numpy as np
from numba import prange

from ._jit import fast_exp, jit
from .activations import bias_act_bwd, bias_act_fwd
from .attention import softmax_causal_bwd, softmax_causal_fwd
from .blas import gemm
from .embedding import embed_bwd, embed_fwd
from .layernorm import layernorm_bwd, layernorm_fwd
from .loss import cross_entropy_fwd_bwd

# the serial builds: a shard runs on one thread
_embed_fwd, _embed_bwd = embed_fwd.serial, embed_bwd.serial
_ln_fwd, _ln_bwd = layernorm_fwd.serial, layernorm_bwd.serial
_act_fwd, _act_bwd = bias_act_fwd.serial, bias_act_bwd.serial
_xent = cross_entropy_fwd_bwd.serial
_softmax_fwd, _softmax_bwd = softmax_causal_fwd.serial, softmax_causal_bwd.serial

# per-layer slots (column of `slots`); -1 where the config has no such parameter
LN1_G, LN1_B, W_Q, W_K, W_V, W_PROJ, B_PROJ, LN2_G, LN2_B, W_FC, B_FC, W_OUT, B_OUT = range(13)
LAYER_SLOTS = ["ln1.g", "ln1.b", "attn.w_q", "attn.w_k", "attn.w_v", "attn.w_proj", "attn.b_proj",
               "ln2.g", "ln2.b", "ffn.w_fc", "ffn.b_fc", "ffn.w_out", "ffn.b_out"]
# model-level slots (entries of `top`)
TOK, POS, LNF_G, LNF_B, LM_W, LM_B = range(6)
TOP_SLOTS = ["tok_emb", "pos_emb", "ln_f.g", "ln_f.b", "lm_head.w", "lm_head.b"]
# flags: n_head, norm (0 none, 1 post, 2 pre), residual, attn_proj, ffn, ffn_proj, activation (0
# relu, 1 gelu)
N_HEAD, NORM, RESIDUAL, ATTN_PROJ, FFN, FFN_PROJ, ACT = range(7)


@jit()
def _add_bias(y, b):
    """y [N, F] += b [1, F]"""
    for n in range(y.shape[0]):
        for f in range(y.shape[1]):
            y[n, f] += b[0, f]


@jit()
def _col_sums(d, out):
    """out [1, F] = sum over rows of d [N, F]"""
    out[0, :] = 0
    for n in range(d.shape[0]):
        for f in range(d.shape[1]):
            out[0, f] += d[n, f]


@jit()
def _attention_fwd(X, T, M, H, scale, valid, Y, P):
    """Causal attention in lanes (short blocks of small heads), the probabilities kept.

    X [3C, T + M + T]: q, k and v transposed (channel c of q in row c, of k in row C + c, of v
    in row 2C + c; head h has channels h*hs:(h+1)*hs), row r of the shard (= b*T + i) in lane
    column T + r, zero pads of T columns on both sides. Y [C, M] = the output, transposed.
    P [H, T, M + T]: P[h, o, r] = the probability with which row r attends to row r - o (o, the
    offset, from 0 to T - 1; 0 where i < o); its right pad (the last T columns) is not written
    here and must be zero for _attention_bwd. valid [T, M]: 1 where i >= o, else 0.

    NumPy reference: numgpt/layers/attention.attention_forward. Why this layout: with 8
    positions of 8 channels a head, the loops of a row-by-row kernel are 8 long, mostly loop
    overhead and horizontal sums. Here every offset o is one sweep over all M rows of the shard
    at once: the score of (r, r - o) sums q[c, r] k[c, r - o] over the head's channels, a
    product of two contiguous rows of X, one shifted by o. A row whose position i < o reads the
    previous sequence (or the pad) there, finite, and is masked out of the softmax."""
    C = Y.shape[0]
    hs = C // H
    dt = Y.dtype
    zero = np.zeros(1, dtype=dt)[0]
    one = np.ones(1, dtype=dt)[0]
    mx = np.empty(M, dtype=dt)
    tot = np.empty(M, dtype=dt)
    for h in range(H):
        c0 = h * hs
        for o in range(T):                     # raw scores s = q_r . k_(r-o), in P
            s = P[h, o, :M]
            s[:] = zero
            for d in range(hs):
                q, k = X[c0 + d, T:T + M], X[C + c0 + d, T - o:T - o + M]
                for r in range(M):
                    s[r] += q[r] * k[r]
        mx[:] = P[h, 0, :M]                    # offset 0 is always in range
        for o in range(1, T):
            s, ok = P[h, o, :M], valid[o]
            for r in range(M):
                mx[r] = max(mx[r], s[r]) if ok[r] > zero else mx[r]
        tot[:] = zero
        for o in range(T):                     # exp(scale (s - max)), 0 out of range
            s, ok = P[h, o, :M], valid[o]
            for r in range(M):                 # (min: an out-of-range score may exceed the max)
                e = fast_exp(min(scale * (s[r] - mx[r]), zero)) * ok[r]
                s[r] = e
                tot[r] += e
        for r in range(M):
            tot[r] = one / tot[r]
        for o in range(T):
            s = P[h, o, :M]
            for r in range(M):
                s[r] *= tot[r]
        for d in range(hs):                    # y_r = sum_o p(r, r-o) v_(r-o)
            y = Y[c0 + d]
            y[:] = zero
            for o in range(T):
                p, v = P[h, o, :M], X[2 * C + c0 + d, T - o:T - o + M]
                for r in range(M):
                    y[r] += p[r] * v[r]


@jit()
def _attention_bwd(X, P, dY, T, M, H, scale, dS, dX):
    """The backward of _attention_fwd: dY [C, M + T] (the output's gradient, transposed) -> dX
    [3C, M]; dS [T, M + T] is scratch. The right pads (the last T columns) of dY, dS and P
    must be zero: the sums below read them. Per head, with
    dp(r, o) = dy_r . v_(r-o) and D_r = sum_o p dp: ds = scale p (dp - D) (0 where p is),
    dq_r = sum_o ds(r, o) k_(r-o), dk_r = sum_o ds(r+o, o) q_(r+o), dv_r = sum_o p(r+o, o)
    dy_(r+o) (docs/derivations.md#attention): the keys' and values' sums read the rows o ahead,
    where the right pads give 0 past the shard's end."""
    C = dX.shape[0] // 3
    hs = C // H
    dt = dX.dtype
    zero = np.zeros(1, dtype=dt)[0]
    D = np.empty(M, dtype=dt)
    for h in range(H):
        c0 = h * hs
        D[:] = zero
        for o in range(T):
            g, p = dS[o, :M], P[h, o, :M]
            g[:] = zero
            for d in range(hs):
                a, v = dY[c0 + d, :M], X[2 * C + c0 + d, T - o:T - o + M]
                for r in range(M):
                    g[r] += a[r] * v[r]
            for r in range(M):
                D[r] += p[r] * g[r]
        for o in range(T):
            g, p = dS[o, :M], P[h, o, :M]
            for r in range(M):
                g[r] = scale * p[r] * (g[r] - D[r])
        for d in range(hs):
            dq, dk, dv = dX[c0 + d], dX[C + c0 + d], dX[2 * C + c0 + d]
            dq[:] = zero
            dk[:] = zero
            dv[:] = zero
            for o in range(T):
                g, k = dS[o, :M], X[C + c0 + d, T - o:T - o + M]
                for r in range(M):
                    dq[r] += g[r] * k[r]
                g, q = dS[o, o:o + M], X[c0 + d, T + o:T + o + M]
                for r in range(M):
                    dk[r] += g[r] * q[r]
                p, a = P[h, o, o:o + M], dY[c0 + d, o:o + M]
                for r in range(M):
                    dv[r] += p[r] * a[r]


# Attention takes the lanes kernels (_attention_fwd/_bwd) where block x head size^2 is at most
# this, and BLAS per (sequence, head) (_attention_blas_fwd/_bwd) where it is more: each lane
# sweep is one channel of one offset, so lanes cost grows with the head size where BLAS's
# products get efficient. Measured here, a layer's forward and backward on one thread (16
# sequences unless said), lanes against BLAS: head size 4: 110 against 266 us at block 16, 508
# against 969 at 32, 1834 against 2241 at 64 (6 sequences: 616 against 786); head size 8: 39
# against 122 at block 8, 89 against 181 at 16, 197 against 260 at 24, 364-431 against 391-537
# at 32, 824 against 780 at 48; head size 16: 26-28 against 41-43 at block 8, 87 against 78 at
# 16; head size 32 at block 8: 25 against 20 (one head), 100 against 77 (4 heads); 6 sequences
# of 4 heads of 32, block 8 to 64: 80 against 46 up to 2375 against 931.
LANES_MAX = 2048


@jit()
def attention_in_lanes(T, head_size):
    """Whether the step's attention of blocks of T positions takes the lanes kernels."""
    return T * head_size * head_size <= LANES_MAX


@jit()
def _linear_bwd(x, dy, W, gW, gb, row, dx):
    """y = x W + b, backward: gW = x^T dy, gb = sum over rows of dy (summed into the local row,
    then copied: see _shard), dx = dy W^T."""
    np.dot(x.T, dy, gW)
    _col_sums(dy, row)
    gb[:] = row
    np.dot(dy, W.T, dx)


@jit()
def _attention_blas_fwd(qkv, nb, T, H, scale, y, p):
    """As _attention_fwd, for longer blocks or larger heads (LANES_MAX), in rows: qkv [nb*T, 3C]
    -> y [nb*T, C], p [nb, H, T, T]. Per (sequence, head) the scores q k^T and the weighted sum
    p v as BLAS products straight on the head's columns of qkv and y (blas.gemm; the masked
    upper half is computed and ignored), with the causal softmax of the stored-probabilities
    path (attention.softmax_causal_fwd) between them."""
    C = y.shape[1]
    hs = C // H
    dt = y.dtype
    for b in range(nb):
        rows = qkv[b * T:(b + 1) * T]
        for h in range(H):
            o = h * hs
            gemm(rows[:, o:o + hs], False, rows[:, C + o:C + o + hs], True, p[b, h], 0.0)
    _softmax_fwd(p, scale, np.zeros((1, 1, 1, 1), dtype=np.bool_), np.ones(1, dtype=dt)[0],
                 False, p, p, np.empty((nb, H, T), dtype=dt))
    for b in range(nb):
        rows = qkv[b * T:(b + 1) * T]
        out = y[b * T:(b + 1) * T]
        for h in range(H):
            o = h * hs
            gemm(p[b, h], False, rows[:, 2 * C + o:2 * C + o + hs], False, out[:, o:o + hs], 0.0)


@jit()
def _attention_blas_bwd(qkv, p, y, dy, nb, T, H, scale, dqkv):
    """The backward of _attention_blas_fwd: dp = dy v^T and dv = p^T dy, dq = ds k, dk = ds^T q
    in BLAS per (sequence, head); ds = scale p (dp - D) by attention.softmax_causal_bwd."""
    C = dy.shape[1]
    hs = C // H
    dt = dy.dtype
    dS = np.empty((nb, H, T, T), dtype=dt)
    for b in range(nb):
        rows, g = qkv[b * T:(b + 1) * T], dy[b * T:(b + 1) * T]
        for h in range(H):
            o = h * hs
            gemm(g[:, o:o + hs], False, rows[:, 2 * C + o:2 * C + o + hs], True, dS[b, h], 0.0)
    _softmax_bwd(p, dS, dy.reshape(nb, T, C), y.reshape(nb, T, C), scale,
                 np.zeros((1, 1, 1, 1), dtype=np.bool_), np.ones(1, dtype=dt)[0], False, p, dS)
    for b in range(nb):
        rows, g, out = qkv[b * T:(b + 1) * T], dy[b * T:(b + 1) * T], dqkv[b * T:(b + 1) * T]
        for h in range(H):
            o = h * hs
            gemm(p[b, h], True, g[:, o:o + hs], False, out[:, 2 * C + o:2 * C + o + hs], 0.0)
            gemm(dS[b, h], False, rows[:, C + o:C + o + hs], False, out[:, o:o + hs], 0.0)
            gemm(dS[b, h], True, rows[:, o:o + hs], False, out[:, C + o:C + o + hs], 0.0)


@jit()
def _shard(idx, tgt, P, G, s, slots, top, flags, wqkv, weight):
    """Forward and backward of the rows idx [nb, T] (targets tgt [nb, T]) on this thread.

    Writes shard s's gradient of weight * (mean loss over these rows) into G[k][s] for every
    parameter k; returns the sum of the rows' losses.
    """
    nb, T = idx.shape
    M = nb * T
    L = slots.shape[0]
    tok = P[top[TOK]]
    C = tok.shape[1]
    V = P[top[LM_W]].shape[1]
    H = flags[N_HEAD]
    norm, residual = flags[NORM], flags[RESIDUAL]
    has_proj, has_ffn, has_out, act = flags[ATTN_PROJ], flags[FFN], flags[FFN_PROJ], flags[ACT]
    F = P[slots[0, W_FC]].shape[1] if has_ffn else C
    dt = tok.dtype
    sc = np.empty(2, dtype=dt)   # constants in the arrays' dtype
    sc[0] = (C // H) ** -0.5
    sc[1] = 1e-5
    scale, eps = sc[0], sc[1]
    n_sub = 2 if has_ffn else 1

    # attention of short blocks of small heads works on its operands transposed, in lanes
    # (_attention_fwd): q, k, v as [3C, T + M + T] with zero pads, the output as [C, M]; the
    # others in rows, through BLAS (_attention_blas_fwd)
    lanes = attention_in_lanes(T, C // H)
    valid = np.zeros((T, M) if lanes else (0, 0), dtype=dt)
    if lanes:
        for o in range(T):
            for r in range(M):
                if r % T >= o:
                    valid[o, r] = 1

    # ---- forward; kept for the backward: every sublayer's LayerNorm input and statistics, the
    # input of its first product, and the attention and feed-forward intermediates
    lnx = np.empty((L, 2, M, C), dtype=dt)
    mean = np.empty((L, 2, M), dtype=dt)
    rstd = np.empty((L, 2, M), dtype=dt)
    hin = np.empty((L, 2, M, C), dtype=dt)
    if lanes:
        qkv = np.empty((L, 3 * C, T + M + T), dtype=dt)
        qkv[:, :, :T] = 0
        qkv[:, :, T + M:] = 0
        att = np.empty((L, C, M), dtype=dt)
        probs = np.zeros((L, H * T * (M + T)), dtype=dt)   # [H, T, M + T] a layer
    else:
        qkv = np.empty((L, M, 3 * C), dtype=dt)
        att = np.empty((L, M, C), dtype=dt)
        probs = np.empty((L, nb * H * T * T), dtype=dt)     # [nb, H, T, T] a layer
    pre = np.empty((L, M, F), dtype=dt)
    hid = np.empty((L, M, F), dtype=dt)
    x = np.empty((M, C), dtype=dt)   # the residual stream
    f = np.empty((M, C), dtype=dt)   # a sublayer's output
    _embed_fwd(idx, tok, P[top[POS]], x.reshape(nb, T, C))
    for l in range(L):
        for j in range(n_sub):
            g_slot = slots[l, LN1_G if j == 0 else LN2_G]
            b_slot = slots[l, LN1_B if j == 0 else LN2_B]
            if norm == 2:
                lnx[l, j] = x
                _ln_fwd(x, P[g_slot][0], P[b_slot][0], eps, hin[l, j], mean[l, j], rstd[l, j])
            else:
                hin[l, j] = x
            if j == 0 and lanes:
                gemm(wqkv[l], True, hin[l, j], True, qkv[l][:, T:T + M], 0.0)
                _attention_fwd(qkv[l], T, M, H, scale, valid, att[l],
                               probs[l].reshape(H, T, M + T))
                if has_proj:
                    gemm(att[l], True, P[slots[l, W_PROJ]], False, f, 0.0)
                    _add_bias(f, P[slots[l, B_PROJ]])
                else:
                    f[:] = att[l].T
            elif j == 0:
                np.dot(hin[l, j], wqkv[l], qkv[l])
                _attention_blas_fwd(qkv[l], nb, T, H, scale, att[l],
                                    probs[l].reshape(nb, H, T, T))
                if has_proj:
                    np.dot(att[l], P[slots[l, W_PROJ]], f)
                    _add_bias(f, P[slots[l, B_PROJ]])
                else:
                    f[:] = att[l]
            else:
                np.dot(hin[l, j], P[slots[l, W_FC]], pre[l])
                _act_fwd(pre[l], P[slots[l, B_FC]][0], act, hid[l])
                if has_out:
                    np.dot(hid[l], P[slots[l, W_OUT]], f)
                    _add_bias(f, P[slots[l, B_OUT]])
                else:
                    f[:] = hid[l]
            if residual:
                f += x
            if norm == 1:
                lnx[l, j] = f
                _ln_fwd(f, P[g_slot][0], P[b_slot][0], eps, x, mean[l, j], rstd[l, j])
            else:
                x[:] = f
    hf = x
    meanf = np.empty(M, dtype=dt)
    rstdf = np.empty(M, dtype=dt)
    if norm != 0:
        hf = np.empty((M, C), dtype=dt)
        _ln_fwd(x, P[top[LNF_G]][0], P[top[LNF_B]][0], eps, hf, meanf, rstdf)
    z = np.empty((M, V), dtype=dt)
    np.dot(hf, P[top[LM_W]], z)
    _add_bias(z, P[top[LM_B]])
    dz = np.empty((M, V), dtype=dt)
    losses = _xent(z, tgt.reshape(M), True, dz)   # dz = (softmax - onehot) / M
    dz *= weight

    # ---- backward
    # vector gradients are summed row by row into a local row, then copied once: the shards'
    # slots of a vector share cache lines, which two threads should not write row after row
    gv = np.empty((1, V), dtype=dt)
    gg = np.empty((1, C), dtype=dt)
    gb = np.empty((1, C), dtype=dt)
    gf = np.empty((1, F), dtype=dt)
    ds = np.empty((M, C), dtype=dt)      # gradient of the residual stream
    _linear_bwd(hf, dz, P[top[LM_W]], G[top[LM_W]][s], G[top[LM_B]][s], gv, ds)
    dh = np.empty((M, C), dtype=dt)
    if norm != 0:
        _ln_bwd(ds, x, P[top[LNF_G]][0], meanf, rstdf, 1, dh, gg, gb)
        G[top[LNF_G]][s][:] = gg
        G[top[LNF_B]][s][:] = gb
        ds, dh = dh, ds
    df = np.empty((M, C), dtype=dt)
    if lanes:   # transposed, as in the forward; the right pads of datt and dS stay zero
        datt = np.zeros((C, M + T), dtype=dt)
        dqkv = np.empty((3 * C, M), dtype=dt)
        dS = np.zeros((T, M + T), dtype=dt)
    else:
        datt = np.empty((M, C), dtype=dt)
        dqkv = np.empty((M, 3 * C), dtype=dt)
        dS = np.empty((0, 0), dtype=dt)
    dhid = np.empty((M, F), dtype=dt)
    dpre = np.empty((M, F), dtype=dt)
    for l in range(L - 1, -1, -1):
        for j in range(n_sub - 1, -1, -1):
            g_slot = slots[l, LN1_G if j == 0 else LN2_G]
            b_slot = slots[l, LN1_B if j == 0 else LN2_B]
            if norm == 1:   # ds is the gradient of the LayerNorm's output
                _ln_bwd(ds, lnx[l, j], P[g_slot][0], mean[l, j], rstd[l, j], 1, df, gg, gb)
                G[g_slot][s][:] = gg
                G[b_slot][s][:] = gb
            else:
                df[:] = ds
            # df: gradient of the sublayer's output (and, with residual, of the skip)
            if j == 0 and lanes:   # the transposed forward's products, transposed back
                dy = datt[:, :M]
                if has_proj:
                    gemm(att[l], False, df, False, G[slots[l, W_PROJ]][s], 0.0)
                    _col_sums(df, gb)
                    G[slots[l, B_PROJ]][s][:] = gb
                    gemm(P[slots[l, W_PROJ]], False, df, True, dy, 0.0)
                else:
                    dy[:] = df.T
                _attention_bwd(qkv[l], probs[l].reshape(H, T, M + T), datt, T, M, H, scale, dS,
                               dqkv)
                for part, slot in ((0, W_Q), (1, W_K), (2, W_V)):  # each its own gradient
                    gemm(hin[l, j], True, dqkv[part * C:(part + 1) * C], True,
                         G[slots[l, slot]][s], 0.0)
                gemm(dqkv, True, wqkv[l], True, dh, 0.0)
            elif j == 0:
                if has_proj:
                    _linear_bwd(att[l], df, P[slots[l, W_PROJ]], G[slots[l, W_PROJ]][s],
                                G[slots[l, B_PROJ]][s], gb, datt)
                else:
                    datt[:] = df
                _attention_blas_bwd(qkv[l], probs[l].reshape(nb, H, T, T), att[l], datt, nb, T,
                                    H, scale, dqkv)
                for part, slot in ((0, W_Q), (1, W_K), (2, W_V)):  # each its own gradient
                    gemm(hin[l, j], True, dqkv[:, part * C:(part + 1) * C], False,
                         G[slots[l, slot]][s], 0.0)
                np.dot(dqkv, wqkv[l].T, dh)
            else:
                if has_out:
                    _linear_bwd(hid[l], df, P[slots[l, W_OUT]], G[slots[l, W_OUT]][s],
                                G[slots[l, B_OUT]][s], gb, dhid)
                else:
                    dhid[:] = df
                _act_bwd(dhid, pre[l], act, 1, dpre, gf)
                G[slots[l, B_FC]][s][:] = gf
                np.dot(hin[l, j].T, dpre, G[slots[l, W_FC]][s])
                np.dot(dpre, P[slots[l, W_FC]].T, dh)
            # dh: gradient of the sublayer's input
            if norm == 2:
                _ln_bwd(dh, lnx[l, j], P[g_slot][0], mean[l, j], rstd[l, j], 1, ds, gg, gb)
                G[g_slot][s][:] = gg
                G[b_slot][s][:] = gb
                if residual:
                    ds += df
            elif residual:
                ds[:] = df
                ds += dh
            else:
                ds[:] = dh
    _embed_bwd(idx, ds.reshape(nb, T, C), G[top[TOK]][s], G[top[POS]][s])
    return losses.sum()


@jit()
def _pack_qkv(P, slots, wqkv):
    """wqkv [L, C, 3C] = each layer's w_q, w_k, w_v side by side (one product for the three)."""
    C = wqkv.shape[1]
    for l in range(wqkv.shape[0]):
        wqkv[l, :, :C] = P[slots[l, W_Q]]
        wqkv[l, :, C:2 * C] = P[slots[l, W_K]]
        wqkv[l, :, 2 * C:] = P[slots[l, W_V]]


@jit()
def _add_shards(G, n_shards):
    """G[k][0] += G[k][s] for every shard s > 0 (the shards' gradients come weighted)."""
    for k in range(len(G)):
        g = G[k]
        for s in range(1, n_shards):
            g[0] += g[s]


@jit(parallel=True)
def train_step(idx, tgt, P, G, slots, top, flags, n_shards, wqkv, sums):
    """The mean loss of the batch idx [B, T] -> targets tgt [B, T], and its gradients: G[k][0]
    is the gradient of parameter P[k] (G[k] is [n_shards, *P[k].shape]; the other shards' slots
    are scratch). The batch is cut into n_shards nearly equal runs of rows, one per thread.
    wqkv [L, C, 3C] and sums [n_shards] (float64) are scratch.

    Only the prange is here: numba runs every array expression of a parallel function as a
    parallel region of its own (thread wake-up and barrier each), so the packing of the weights
    and the sum over the shards are serial helpers. They were ~50 such regions a step, most of
    them the gradient sums."""
    B, T = idx.shape
    dt = wqkv.dtype
    _pack_qkv(P, slots, wqkv)
    for s in prange(n_shards):
        b0 = (s * B) // n_shards
        b1 = ((s + 1) * B) // n_shards
        w = np.empty(1, dtype=dt)
        w[0] = (b1 - b0) / B     # this shard's share of the mean
        # s as int64: numba types a prange index as uint64 in the parallel build, and _shard was
        # compiled a second time for it; with one signature the serial build, which shares it,
        # compiles in 7 s after the parallel one
        sums[s] = _shard(idx[b0:b1].copy(), tgt[b0:b1].copy(), P, G, np.int64(s), slots, top,
                         flags, wqkv, w[0])
    _add_shards(G, n_shards)
    tot = 0.0
    for s in range(n_shards):
        tot += sums[s]
    return tot / (B * T)
