"""A whole training step (forward, backward, loss) of a small GPT in one compiled call.

NumPy reference: numgpt/model.py (GPT.loss_and_grads), layer by layer. Derivations: every section
of docs/derivations.md. Tests: tests/test_step.py holds it equal to the reference and runs the
float64 gradient check through it; tests/test_kernels.py holds prefill equal to model.forward
with the key/value cache.

Why: a small model's step is a few hundred small operations, and from Python each costs a
call that can take longer than its work, so for the smallest models (the bench's tiny config)
most of a layer-by-layer step is spent between kernels (docs/kernels.md). Here the batch is
split in one piece per core (prange over shards), and each piece runs the model's whole forward
and backward without returning to Python: the matrix products through BLAS (numba's np.dot, and
blas.gemm where the operands are column slices or transposed; both SciPy's OpenBLAS, one thread
per shard), everything between them through the serial builds of the other kernels of this
folder. Each shard writes its own gradient slots; they are summed at the end.

The file reads like numgpt/model.py, bottom up, with its names: a forward/backward pair per
layer (_linear_*, _layernorm_*, the embedding's kernels _embed_*; the attention kernels
_attention_lanes_* and _attention_blas_*), per sublayer (_multihead_*, _feedforward_*, as
numgpt/layers names them), a block's pieces (_norm_in, _sublayer, _add, _norm_out and their
backward passes, as model.py's) and the head (_head_forward/_head_backward: final LayerNorm,
lm_head, as GPT's). The block itself is numgpt.arch.block_forward and block_backward, the same
two functions the model runs, here compiled with this file's pieces. _forward composes the
forward (embed, blocks, head), _shard adds the loss and the backward in reverse (the residual
stream's gradient dx, as in GPT.backward), and train_step runs the shards. A name ending in
_forward/_backward is a step as numgpt/model.py names it (a layer's or the head's); one ending
in _fwd/_bwd is a numba kernel (from kernels/*.py, or the attention kernels here). Sampling runs
the same _forward over a whole context (prefill), keeping its keys and values. A shard's arrays
are allocated once per call in a _Work (_workspace) that the pieces write into. Everything above
the kernels is inlined into _forward and _shard when they compile (jit(inline=True); the block's
pieces through kernels/_jit.pieces).

Parameters come in a numba typed List of 2-D arrays in the order of numgpt.model.param_shapes
(vectors as [1, n] rows); `slots` and `top` say which entry is which. Dropout is not done
here: a model with dropout trains on the layer-by-layer path.
"""
from typing import NamedTuple

import numpy as np
from numba import prange

from numgpt.arch import (BLOCK_PARAMS, NORM_NONE, SUB_ATTN, SUBLAYERS, TOP_PARAMS, Arch,
                         BlockBackward, BlockForward)
from numgpt.layers.layernorm import EPS as LN_EPS

from ._jit import block_backward, block_forward, fast_exp, jit, pieces
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
ONE_CHUNK = 1     # n_chunks of the serial backward kernels' partial sums: a shard sums its rows
WITH_GRAD = True  # _xent's want_grad: the loss's gradient dz too

# a layer's parameters by their place in numgpt.arch.BLOCK_PARAMS (the columns of `slots`; -1 where
# the config has no such parameter), the model's others by their place in TOP_PARAMS (`top`)
W_Q, W_K, W_V, W_PROJ, B_PROJ, W_FC, B_FC, W_OUT, B_OUT = map(
    BLOCK_PARAMS.index, ("attn.w_q", "attn.w_k", "attn.w_v", "attn.w_proj", "attn.b_proj",
                         "ffn.w_fc", "ffn.b_fc", "ffn.w_out", "ffn.b_out"))
TOK, POS, LNF_G, LNF_B, LM_W, LM_B = map(TOP_PARAMS.index, ("tok_emb", "pos_emb", "ln_f.g",
                                                         "ln_f.b", "lm_head.w", "lm_head.b"))
# each sublayer's LayerNorm (g and b), by sublayer: LN_G[SUB_ATTN] is ln1.g's place
LN_G = tuple(BLOCK_PARAMS.index(ln + ".g") for _, ln in SUBLAYERS)
LN_B = tuple(BLOCK_PARAMS.index(ln + ".b") for _, ln in SUBLAYERS)
N_SUB = len(SUBLAYERS)  # the second axis of the per-sublayer buffers (lnx, mean, rstd, hin)


# ---- Linear and LayerNorm (docs/derivations.md#linear, #layernorm) ----

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


@jit(inline=True)
def _linear_forward(x, W, b, y):
    """y = x W + b"""
    np.dot(x, W, y)
    _add_bias(y, b)


@jit(inline=True)
def _linear_backward(x, dy, W, gW, gb, row, dx):
    """y = x W + b, backward: gW = x^T dy, gb = sum over rows of dy (summed into the local row,
    then copied: see _shard), dx = dy W^T."""
    np.dot(x.T, dy, gW)
    _col_sums(dy, row)
    gb[:] = row
    np.dot(dy, W.T, dx)


@jit(inline=True)
def _layernorm_forward(x, g, b, eps, keep, y, mean, rstd):
    """y = g (x - mean) rstd + b over each row, rstd = 1 / sqrt(var + eps); x kept in `keep` and
    the statistics in mean, rstd for _layernorm_backward (y may be x). g, b: [1, C] rows."""
    keep[:] = x
    _ln_fwd(keep, g[0], b[0], eps, y, mean, rstd)


@jit(inline=True)
def _layernorm_backward(dy, x, g, mean, rstd, dx, gg, gb, Gg, Gb):
    """The backward of _layernorm_forward: with xhat = (x - mean) rstd and dxhat = dy g,
    dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)); Gg = sum over rows of dy xhat,
    Gb = sum over rows of dy (summed in the local rows gg, gb, then copied: see _shard)."""
    _ln_bwd(dy, x, g[0], mean, rstd, ONE_CHUNK, dx, gg, gb)
    Gg[:] = gg
    Gb[:] = gb


# ---- causal attention (docs/derivations.md#attention): in lanes, or per head in BLAS ----

@jit()
def _attention_lanes_fwd(X, T, M, H, scale, valid, Y, P):
    """Causal attention in lanes (short blocks of small heads), the probabilities kept.

    X [3C, T + M + T]: q, k and v transposed (channel c of q in row c, of k in row C + c, of v
    in row 2C + c; head h has channels h*hs:(h+1)*hs), row r of the shard (= b*T + i) in lane
    column T + r, zero pads of T columns on both sides. Y [C, M] = the output, transposed.
    P [H, T, M + T]: P[h, o, r] = p(r, o), the probability with which row r attends to row
    r - o (o, the offset, from 0 to T - 1; 0 where i < o); its right pad (the last T columns)
    is not written here and must be zero for _attention_lanes_bwd. valid [T, M]: 1 where
    i >= o, else 0.

    NumPy reference: numgpt/layers/attention.attention_forward. Why this layout: with 8
    positions of 8 channels a head, the loops of a row-by-row kernel are 8 long, mostly loop
    overhead and horizontal sums. Here every offset o is one sweep over all M rows of the shard
    at once: the score of (r, r - o) sums q[c, r] k[c, r - o] over the head's channels, a
    product of two contiguous rows of X, one shifted by o. A row whose position i < o reads the
    previous sequence (or the pad) there, finite, and is masked out of the softmax."""
    C = Y.shape[0]
    hs = C // H
    dtype = Y.dtype
    zero = np.zeros(1, dtype=dtype)[0]
    one = np.ones(1, dtype=dtype)[0]
    mx = np.empty(M, dtype=dtype)
    tot = np.empty(M, dtype=dtype)
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
        for d in range(hs):                    # y_r = sum_o p(r, o) v_(r-o)
            y = Y[c0 + d]
            y[:] = zero
            for o in range(T):
                p, v = P[h, o, :M], X[2 * C + c0 + d, T - o:T - o + M]
                for r in range(M):
                    y[r] += p[r] * v[r]


@jit()
def _attention_lanes_bwd(X, P, dY, T, M, H, scale, dS, dX):
    """The backward of _attention_lanes_fwd: dY [C, M + T] (the output's gradient, transposed) -> dX
    [3C, M]; dS [T, M + T] is scratch. The right pads (the last T columns) of dY, dS and P
    must be zero: the sums below read them. Per head, with
    dp(r, o) = dy_r . v_(r-o) and D_r = sum_o p dp: ds = scale p (dp - D) (0 where p is),
    dq_r = sum_o ds(r, o) k_(r-o), dk_r = sum_o ds(r+o, o) q_(r+o), dv_r = sum_o p(r+o, o)
    dy_(r+o) (docs/derivations.md#attention): the keys' and values' sums read the rows o ahead,
    where the right pads give 0 past the shard's end."""
    C = dX.shape[0] // 3
    hs = C // H
    dtype = dX.dtype
    zero = np.zeros(1, dtype=dtype)[0]
    D = np.empty(M, dtype=dtype)
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


@jit()
def _attention_blas_fwd(qkv, nb, T, H, scale, y, p):
    """As _attention_lanes_fwd, in rows (the step for longer blocks or larger heads): qkv [nb*T, 3C]
    -> y [nb*T, C], p [nb, H, T, T]. Per (sequence, head) the scores q k^T and the weighted sum
    p v as BLAS products straight on the head's columns of qkv and y (blas.gemm; the masked
    upper half is computed and ignored), with the causal softmax of the stored-probabilities
    path (attention.softmax_causal_fwd) between them."""
    C = y.shape[1]
    hs = C // H
    dtype = y.dtype
    for b in range(nb):
        rows = qkv[b * T:(b + 1) * T]
        for h in range(H):
            o = h * hs
            gemm(rows[:, o:o + hs], False, rows[:, C + o:C + o + hs], True, p[b, h], 0.0)
    _softmax_fwd(p, scale, np.zeros((1, 1, 1, 1), dtype=np.bool_), np.ones(1, dtype=dtype)[0],
                 False, p, p)
    for b in range(nb):
        rows = qkv[b * T:(b + 1) * T]
        out = y[b * T:(b + 1) * T]
        for h in range(H):
            o = h * hs
            gemm(p[b, h], False, rows[:, 2 * C + o:2 * C + o + hs], False, out[:, o:o + hs], 0.0)


@jit()
def _attention_blas_bwd(qkv, p, y, dy, nb, T, H, scale, dqkv):
    """The backward of _attention_blas_fwd: dp = dy v^T and dv = p^T dy, dq = ds k, dk = ds^T q
    in BLAS per (sequence, head); ds = scale p (dp - D), D_r = dy_r . y_r for the head's row r,
    by attention.softmax_causal_bwd."""
    C = dy.shape[1]
    hs = C // H
    dtype = dy.dtype
    dS = np.empty((nb, H, T, T), dtype=dtype)
    for b in range(nb):
        rows, g = qkv[b * T:(b + 1) * T], dy[b * T:(b + 1) * T]
        for h in range(H):
            o = h * hs
            gemm(g[:, o:o + hs], False, rows[:, 2 * C + o:2 * C + o + hs], True, dS[b, h], 0.0)
    _softmax_bwd(p, dS, dy.reshape(nb, T, C), y.reshape(nb, T, C), scale,
                 np.zeros((1, 1, 1, 1), dtype=np.bool_), np.ones(1, dtype=dtype)[0], False, p, dS)
    for b in range(nb):
        rows, g, out = qkv[b * T:(b + 1) * T], dy[b * T:(b + 1) * T], dqkv[b * T:(b + 1) * T]
        for h in range(H):
            o = h * hs
            gemm(p[b, h], True, g[:, o:o + hs], False, out[:, 2 * C + o:2 * C + o + hs], 0.0)
            gemm(dS[b, h], False, rows[:, C + o:C + o + hs], False, out[:, o:o + hs], 0.0)
            gemm(dS[b, h], True, rows[:, o:o + hs], False, out[:, C + o:C + o + hs], 0.0)


# ---- a shard's arrays ----

class _Work(NamedTuple):
    """One shard's arrays, allocated once per call by _workspace; the pieces write into them.
    Per layer l and sublayer j (SUB_ATTN, SUB_FFN), kept from the forward for the backward:
    a LayerNorm's input and statistics, the sublayer's input and the attention and feed-forward
    intermediates. With lanes, attention's operands are transposed (see _attention_lanes_fwd)."""
    nb: int            # sequences in the shard
    T: int             # positions per sequence
    M: int             # rows, nb * T
    lanes: bool        # attention in lanes (else per head in BLAS)
    scale: float       # 1 / sqrt(head size), in the arrays' dtype
    eps: float         # LayerNorm's, in the arrays' dtype
    valid: np.ndarray  # [T, M]: 1 where row r's position r % T >= the offset (lanes only)
    # the forward's, per layer
    lnx: np.ndarray    # [L, N_SUB, M, C] LayerNorm inputs
    mean: np.ndarray   # [L, N_SUB, M]
    rstd: np.ndarray   # [L, N_SUB, M]
    hin: np.ndarray    # [L, N_SUB, M, C] sublayer inputs
    qkv: np.ndarray    # [L, 3C, T + M + T] (lanes, zero pads) or [L, M, 3C]
    att: np.ndarray    # [L, C, M] (lanes) or [L, M, C]: attention's output before the projection
    probs: np.ndarray  # [L, H * T * (M + T)] (lanes) or [L, nb * H * T * T]
    pre: np.ndarray    # [L, M, F] feed-forward pre-activation (with its bias)
    hid: np.ndarray    # [L, M, F] its activation
    # the stream and the head
    x: np.ndarray      # [M, C] the residual stream (w.f after a sublayer without residual sum)
    f: np.ndarray      # [M, C] a sublayer's output
    hf: np.ndarray     # [M, C] the final LayerNorm's output ([0, C] without norm)
    meanf: np.ndarray  # [M]
    rstdf: np.ndarray  # [M]
    z: np.ndarray      # [M, V] logits
    dz: np.ndarray     # [M, V] their gradient
    # the backward's scratch
    dx: np.ndarray     # [M, C] gradient of the residual stream (after a residual sum)
    df: np.ndarray     # [M, C] gradient of a sublayer's output
    dh: np.ndarray     # [M, C] gradient of a sublayer's input
    datt: np.ndarray   # [C, M + T] (lanes, right pad zero) or [M, C]
    dqkv: np.ndarray   # [3C, M] (lanes) or [M, 3C]
    dS: np.ndarray     # [T, M + T] (lanes, right pad zero) or [0, 0]
    dhid: np.ndarray   # [M, F]
    dpre: np.ndarray   # [M, F]
    gv: np.ndarray     # [1, V], [1, C], [1, C], [1, F]: vector gradients' local rows
    gg: np.ndarray
    gb: np.ndarray
    gf: np.ndarray


@jit(inline=True)
def _workspace(a, nb, T, C, F, V, dtype, lanes, L):
    """A _Work for a shard of nb sequences of T positions of the model a (numgpt.arch.Arch) with
    C channels, feed-forward width F, vocabulary V, in the dtype `dtype`; attention in lanes or
    not; the intermediates of L layers (every layer's for a backward pass, one for a forward
    alone)."""
    M = nb * T
    H = a.n_head
    sc = np.empty(2, dtype=dtype)   # constants in the arrays' dtype
    sc[0] = (C // H) ** -0.5
    sc[1] = LN_EPS
    valid = np.zeros((T, M) if lanes else (0, 0), dtype=dtype)
    if lanes:
        for o in range(T):
            for r in range(M):
                if r % T >= o:
                    valid[o, r] = 1
    # the forward's (in the order the step first writes them)
    lnx = np.empty((L, N_SUB, M, C), dtype=dtype)
    mean = np.empty((L, N_SUB, M), dtype=dtype)
    rstd = np.empty((L, N_SUB, M), dtype=dtype)
    hin = np.empty((L, N_SUB, M, C), dtype=dtype)
    if lanes:
        qkv = np.empty((L, 3 * C, T + M + T), dtype=dtype)
        qkv[:, :, :T] = 0
        qkv[:, :, T + M:] = 0
        att = np.empty((L, C, M), dtype=dtype)
        probs = np.zeros((L, H * T * (M + T)), dtype=dtype)   # [H, T, M + T] a layer
    else:
        qkv = np.empty((L, M, 3 * C), dtype=dtype)
        att = np.empty((L, M, C), dtype=dtype)
        probs = np.empty((L, nb * H * T * T), dtype=dtype)     # [nb, H, T, T] a layer
    pre = np.empty((L, M, F), dtype=dtype)
    hid = np.empty((L, M, F), dtype=dtype)
    x = np.empty((M, C), dtype=dtype)
    f = np.empty((M, C), dtype=dtype)
    meanf = np.empty(M, dtype=dtype)
    rstdf = np.empty(M, dtype=dtype)
    n_hf = M if a.norm != NORM_NONE else 0
    hf = np.empty((n_hf, C), dtype=dtype)
    z = np.empty((M, V), dtype=dtype)
    dz = np.empty((M, V), dtype=dtype)
    # the backward's
    gv = np.empty((1, V), dtype=dtype)
    gg = np.empty((1, C), dtype=dtype)
    gb = np.empty((1, C), dtype=dtype)
    gf = np.empty((1, F), dtype=dtype)
    dx = np.empty((M, C), dtype=dtype)
    dh = np.empty((M, C), dtype=dtype)
    df = np.empty((M, C), dtype=dtype)
    if lanes:   # transposed, as in the forward; the right pads of datt and dS stay zero
        datt = np.zeros((C, M + T), dtype=dtype)
        dqkv = np.empty((3 * C, M), dtype=dtype)
        dS = np.zeros((T, M + T), dtype=dtype)
    else:
        datt = np.empty((M, C), dtype=dtype)
        dqkv = np.empty((M, 3 * C), dtype=dtype)
        dS = np.empty((0, 0), dtype=dtype)
    dhid = np.empty((M, F), dtype=dtype)
    dpre = np.empty((M, F), dtype=dtype)
    scale, eps = sc[0], sc[1]
    return _Work(nb, T, M, lanes, scale, eps, valid, lnx, mean, rstd, hin, qkv, att, probs, pre,
                 hid, x, f, hf, meanf, rstdf, z, dz, dx, df, dh, datt, dqkv, dS, dhid, dpre, gv,
                 gg, gb, gf)


# ---- one layer's state, read by the pieces below ----

class _Layer(NamedTuple):
    """What the pieces of a block read for layer l (st, in numgpt.arch.block_forward's terms):
    the model's Arch, the shard's _Work and the layer's index l in its per-layer arrays, the
    parameters P, the layer's row p of `slots` and its wqkv [C, 3C] (w_q, w_k, w_v side by side);
    for the backward the gradients G and the shard's slot s in them (None and 0 in the forward)."""
    a: Arch
    w: _Work
    l: int
    P: object
    p: np.ndarray
    wqkv: np.ndarray
    G: object
    s: int


@jit(inline=True)
def _same(u, v):
    """Whether u and v are one buffer (of the _Work)."""
    return u.ctypes.data == v.ctypes.data


# ---- the sublayers (numgpt/layers/attention.py, feedforward.py) ----

@jit(inline=True)
def _multihead_forward(st, h, f):
    """f [M, C] = multi-head causal attention of h [M, C] (layers.attention.multihead_forward):
    q, k, v = h w_q, h w_k, h w_v (one product with wqkv = [w_q w_k w_v]); per head
    y = softmax(q k^T / sqrt(hs), causal) v; f = y w_proj + b_proj (attn_proj), else f = y.
    Kept in w for layer l: qkv, y (att) and the probabilities."""
    a, w, l, P, p = st.a, st.w, st.l, st.P, st.p
    T, M, H = w.T, w.M, a.n_head
    if w.lanes:   # transposed: qkv^T = wqkv^T h^T into the lanes between the pads
        gemm(st.wqkv, True, h, True, w.qkv[l][:, T:T + M], 0.0)
        _attention_lanes_fwd(w.qkv[l], T, M, H, w.scale, w.valid, w.att[l],
                             w.probs[l].reshape(H, T, M + T))
        if a.attn_proj:   # f = (y^T)^T w_proj + b_proj
            gemm(w.att[l], True, P[p[W_PROJ]], False, f, 0.0)
            _add_bias(f, P[p[B_PROJ]])
        else:
            f[:] = w.att[l].T
    else:
        np.dot(h, st.wqkv, w.qkv[l])
        _attention_blas_fwd(w.qkv[l], w.nb, T, H, w.scale, w.att[l],
                            w.probs[l].reshape(w.nb, H, T, T))
        if a.attn_proj:
            _linear_forward(w.att[l], P[p[W_PROJ]], P[p[B_PROJ]], f)
        else:
            f[:] = w.att[l]


@jit(inline=True)
def _multihead_backward(st, h, df, dh):
    """The backward of _multihead_forward: df [M, C] (gradient of f) -> dh [M, C] (of h);
    with attn_proj dy = df w_proj^T, G[w_proj] = y^T df, G[b_proj] = sum over rows of df; the
    attention's backward gives dq, dk, dv; G[w_q] = h^T dq (and k, v alike), dh = dqkv wqkv^T.
    Gradients go to shard s's slots of G."""
    a, w, l, P, G, s, p, wqkv = st.a, st.w, st.l, st.P, st.G, st.s, st.p, st.wqkv
    T, M, H, C = w.T, w.M, a.n_head, df.shape[1]
    if w.lanes:   # the transposed forward's products, transposed back
        dy = w.datt[:, :M]
        if a.attn_proj:
            gemm(w.att[l], False, df, False, G[p[W_PROJ]][s], 0.0)
            _col_sums(df, w.gb)
            G[p[B_PROJ]][s][:] = w.gb
            gemm(P[p[W_PROJ]], False, df, True, dy, 0.0)
        else:
            dy[:] = df.T
        _attention_lanes_bwd(w.qkv[l], w.probs[l].reshape(H, T, M + T), w.datt, T, M, H, w.scale,
                             w.dS, w.dqkv)
        for part, slot in ((0, W_Q), (1, W_K), (2, W_V)):  # each its own gradient
            gemm(h, True, w.dqkv[part * C:(part + 1) * C], True, G[p[slot]][s], 0.0)
        gemm(w.dqkv, True, wqkv, True, dh, 0.0)
    else:
        if a.attn_proj:
            _linear_backward(w.att[l], df, P[p[W_PROJ]], G[p[W_PROJ]][s], G[p[B_PROJ]][s], w.gb,
                             w.datt)
        else:
            w.datt[:] = df
        _attention_blas_bwd(w.qkv[l], w.probs[l].reshape(w.nb, H, T, T), w.att[l], w.datt, w.nb,
                            T, H, w.scale, w.dqkv)
        for part, slot in ((0, W_Q), (1, W_K), (2, W_V)):  # each its own gradient
            gemm(h, True, w.dqkv[:, part * C:(part + 1) * C], False, G[p[slot]][s], 0.0)
        np.dot(w.dqkv, wqkv.T, dh)


@jit(inline=True)
def _feedforward_forward(st, h, f):
    """f [M, C] = the feed-forward of h [M, C] (layers.feedforward.feedforward_forward):
    pre = h w_fc + b_fc, hid = act(pre), f = hid w_out + b_out (ffn_proj), else f = hid.
    Kept in w for layer l: pre and hid."""
    a, w, l, P, p = st.a, st.w, st.l, st.P, st.p
    np.dot(h, P[p[W_FC]], w.pre[l])
    _act_fwd(w.pre[l], P[p[B_FC]][0], a.activation, w.hid[l])   # adds b_fc into pre
    if a.ffn_proj:
        _linear_forward(w.hid[l], P[p[W_OUT]], P[p[B_OUT]], f)
    else:
        f[:] = w.hid[l]


@jit(inline=True)
def _feedforward_backward(st, h, df, dh):
    """The backward of _feedforward_forward: df -> dh. dhid = df w_out^T (G[w_out] = hid^T df,
    G[b_out] = sum of df) or df; dpre = dhid act'(pre), G[b_fc] = sum of dpre;
    G[w_fc] = h^T dpre; dh = dpre w_fc^T."""
    a, w, l, P, G, s, p = st.a, st.w, st.l, st.P, st.G, st.s, st.p
    if a.ffn_proj:
        _linear_backward(w.hid[l], df, P[p[W_OUT]], G[p[W_OUT]][s], G[p[B_OUT]][s], w.gb, w.dhid)
    else:
        w.dhid[:] = df
    _act_bwd(w.dhid, w.pre[l], a.activation, ONE_CHUNK, w.dpre, w.gf)
    G[p[B_FC]][s][:] = w.gf
    np.dot(h.T, w.dpre, G[p[W_FC]][s])
    np.dot(w.dpre, P[p[W_FC]].T, dh)


# ---- a block's pieces: numgpt.arch.block_forward and block_backward put them together ----
#
# Forward, the residual stream x is w.x where there is a residual sum, else the last sublayer's
# output w.f; backward, its gradient is w.dx after a residual sum, else w.df or w.dh, which hold
# the sublayers' gradients (see _sublayer_backward).

@jit(inline=True)
def _norm_in(st, j, x):
    """Pre-norm: h = LN_j(x) into w.hin[l, j], the sublayer's input kept for the backward."""
    w, l, P, p = st.w, st.l, st.P, st.p
    _layernorm_forward(x, P[p[LN_G[j]]], P[p[LN_B[j]]], w.eps, w.lnx[l, j], w.hin[l, j],
                       w.mean[l, j], w.rstd[l, j])
    return w.hin[l, j]


@jit(inline=True)
def _sublayer(st, j, h):
    """f = attention (j = SUB_ATTN) or the feed-forward of h, into w.f; h kept in w.hin[l, j]
    (where _norm_in has not put it already)."""
    w = st.w
    hin = w.hin[st.l, j]
    if not _same(h, hin):
        hin[:] = h
    if j == SUB_ATTN:
        _multihead_forward(st, hin, w.f)
    else:
        _feedforward_forward(st, hin, w.f)
    return w.f


@jit(inline=True)
def _add(st, x, f):
    """x + f, into x."""
    x += f
    return x


@jit(inline=True)
def _norm_out(st, j, x):
    """Post-norm: x = LN_j(x), in place (its input kept in w.lnx[l, j])."""
    w, l, P, p = st.w, st.l, st.P, st.p
    _layernorm_forward(x, P[p[LN_G[j]]], P[p[LN_B[j]]], w.eps, w.lnx[l, j], x, w.mean[l, j],
                       w.rstd[l, j])
    return x


@jit(inline=True)
def _norm_out_backward(st, j, dy):
    """The backward of _norm_out: dy -> dx, into w.df; LN_j's gradients into shard s's slots."""
    w, l, P, G, s, p = st.w, st.l, st.P, st.G, st.s, st.p
    g, b = p[LN_G[j]], p[LN_B[j]]
    _layernorm_backward(dy, w.lnx[l, j], P[g], w.mean[l, j], w.rstd[l, j], w.df, w.gg, w.gb,
                        G[g][s], G[b][s])
    return w.df


@jit(inline=True)
def _sublayer_backward(st, j, df):
    """The backward of _sublayer: df -> dh, into w.dh (into w.df where df is w.dh itself: a block
    without residual sums or LayerNorms hands one sublayer's dh to the next as its df)."""
    w = st.w
    dh = w.df if _same(df, w.dh) else w.dh
    if j == SUB_ATTN:
        _multihead_backward(st, w.hin[st.l, j], df, dh)
    else:
        _feedforward_backward(st, w.hin[st.l, j], df, dh)
    return dh


@jit(inline=True)
def _norm_in_backward(st, j, dh):
    """The backward of _norm_in: dh -> dx, into w.df; LN_j's gradients into shard s's slots."""
    return _norm_out_backward(st, j, dh)   # the same LayerNorm of the same kept input


@jit(inline=True)
def _add_backward(st, dy, dh):
    """The backward of _add: dx = dy + dh, into w.dx (the skip passes the sum's gradient dy on to
    x; dh came back through the sublayer)."""
    dx = st.w.dx
    for n in range(dx.shape[0]):
        for c in range(dx.shape[1]):
            dx[n, c] = dy[n, c] + dh[n, c]
    return dx


FORWARD = pieces("step.FORWARD", BlockForward(
    norm_in=_norm_in, sublayer=_sublayer, add=_add, norm_out=_norm_out))
BACKWARD = pieces("step.BACKWARD", BlockBackward(
    norm_out=_norm_out_backward, sublayer=_sublayer_backward, norm_in=_norm_in_backward,
    add=_add_backward))


# ---- the head (numgpt/model.py: GPT._head_forward, GPT._head_backward) ----

@jit(inline=True)
def _head_forward(a, w, P, top, x):
    """Logits z = LN_f(x) W + b (LN_f unless norm is none; its output kept in w.hf) into w.z.
    LN_f is the kernel itself, not _layernorm_forward: its input x, the last block's output, is
    kept by the caller for _head_backward, so it needs no copy."""
    hf = x
    if a.norm != NORM_NONE:
        hf = w.hf
        _ln_fwd(x, P[top[LNF_G]][0], P[top[LNF_B]][0], w.eps, hf, w.meanf, w.rstdf)
    _linear_forward(hf, P[top[LM_W]], P[top[LM_B]], w.z)


@jit(inline=True)
def _head_backward(a, w, P, G, s, top, x, dx):
    """The backward of _head_forward: w.dz -> dx [M, C], the gradient of the last block's output;
    the lm_head's (and LN_f's) gradients into shard s's slots of G:
        lm_head (_linear_backward):   dhf = dz W^T,  dW = hf^T dz,  db = sum over rows of dz
        LN_f (_layernorm_backward):   dx = LN_f'(dhf), with LN_f's dg and db (dx = dhf when
                                      norm is none)"""
    if a.norm != NORM_NONE:
        _linear_backward(w.hf, w.dz, P[top[LM_W]], G[top[LM_W]][s], G[top[LM_B]][s], w.gv, w.dh)
        _layernorm_backward(w.dh, x, P[top[LNF_G]], w.meanf, w.rstdf, dx, w.gg, w.gb,
                            G[top[LNF_G]][s], G[top[LNF_B]][s])
    else:
        _linear_backward(x, w.dz, P[top[LM_W]], G[top[LM_W]][s], G[top[LM_B]][s], w.gv, dx)


# ---- the model top to bottom (numgpt/model.py: GPT.forward, GPT.backward) ----

@jit(inline=True)
def _model_workspace(a, nb, T, P, slots, top, lanes, L):
    """_workspace for nb sequences of T positions of the model whose parameters are P."""
    C = P[top[TOK]].shape[1]
    V = P[top[LM_W]].shape[1]
    F = P[slots[0, W_FC]].shape[1] if a.ffn else C
    return _workspace(a, nb, T, C, F, V, P[top[TOK]].dtype, lanes, L)


@jit()
def _keep_kv(qkv, H, K, V):
    """K[b, h, i], V[b, h, i] = head h's key and value columns of qkv [nb * n, 3C] at row
    b * n + i: a layer's keys and values of n positions, into its cache."""
    nb = K.shape[0]
    n = qkv.shape[0] // nb
    C = qkv.shape[1] // 3
    hs = C // H
    for b in range(nb):
        for h in range(H):
            k0, v0 = C + h * hs, 2 * C + h * hs
            for i in range(n):
                K[b, h, i] = qkv[b * n + i, k0:k0 + hs]
                V[b, h, i] = qkv[b * n + i, v0:v0 + hs]


@jit()
def _forward(idx, P, slots, top, a, wqkv, w, K, V):
    """The logits of the rows idx [nb, T] (positions 0 .. T-1) into w.z [nb * T, V]:
    x = tok_emb[idx] + pos_emb[:T]; the blocks (numgpt.arch.block_forward with the pieces
    above); the head. Returns the last block's output x [M, C] (the head's backward reads it).
    With K, V empty, every layer's intermediates stay in w for the backward; else (sampling's
    prefill) w holds one layer's at a time, and each layer's keys and values go to
    K, V [L, nb, H, >= T, hs] (_keep_kv)."""
    nb, T = idx.shape
    C = w.x.shape[1]
    x = w.x
    keep_all = K.size == 0
    _embed_fwd(idx, P[top[TOK]], P[top[POS]], x.reshape(nb, T, C))
    for l in range(a.n_layer):
        st = _Layer(a, w, l if keep_all else 0, P, slots[l], wqkv[l], None, 0)
        x = block_forward(a, FORWARD, st, x)
        if not keep_all:
            _keep_kv(w.qkv[0], a.n_head, K[l], V[l])
    _head_forward(a, w, P, top, x)
    return x


@jit()
def _shard(idx, tgt, P, G, s, slots, top, a, lanes, wqkv, weight):
    """Forward and backward of the rows idx [nb, T] (targets tgt [nb, T]) on this thread, for
    the model a (numgpt.arch.Arch), attention in lanes or in BLAS (train_step).

    Writes shard s's gradient of weight * (mean loss over these rows) into G[k][s] for every
    parameter k; returns the sum of the rows' losses. Vector gradients are summed row by row
    into a local row of the workspace, then copied once: the shards' slots of a vector share
    cache lines, which two threads should not write row after row.
    """
    nb, T = idx.shape
    C = P[top[TOK]].shape[1]
    w = _model_workspace(a, nb, T, P, slots, top, lanes, a.n_layer)
    # ---- forward: the logits (every layer's intermediates kept); the loss
    no_cache = np.empty((0, 0, 0, 0, 0), dtype=w.x.dtype)
    x = _forward(idx, P, slots, top, a, wqkv, w, no_cache, no_cache)
    dz = w.dz
    losses = _xent(w.z, tgt.reshape(w.M), WITH_GRAD, dz)   # dz = (softmax - onehot) / M
    dz *= weight
    # ---- backward, in reverse
    dx = w.dx
    _head_backward(a, w, P, G, s, top, x, dx)
    for l in range(a.n_layer - 1, -1, -1):
        st = _Layer(a, w, l, P, slots[l], wqkv[l], G, s)
        dx = block_backward(a, BACKWARD, st, dx)
    _embed_bwd(idx, dx.reshape(nb, T, C), G[top[TOK]][s], G[top[POS]][s])
    return losses.sum()


@jit()
def prefill(idx, P, slots, top, arch, wqkv, K, V, logits):
    """Sampling's pass over a whole context (numgpt/generate.py, KVCache.prefill): _forward of
    the rows idx [B, n] from position 0, no loss, on the calling thread (BLAS on its own
    threads), one layer's intermediates held at a time. logits [B, V] = each row's last
    position's; every layer's keys and values of the n positions into K, V [L, B, H, >= n, hs].
    wqkv [L, C, 3C]: each layer's w_q, w_k, w_v side by side (the cache's KVCache.w_qkv)."""
    a = Arch(*arch)
    nb, n = idx.shape
    w = _model_workspace(a, nb, n, P, slots, top, False, 1)
    _forward(idx, P, slots, top, a, wqkv, w, K, V)
    for b in range(nb):
        logits[b] = w.z[b * n + n - 1]


# ---- the step: the batch in shards, one per thread ----

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
def train_step(idx, tgt, P, G, slots, top, arch, lanes, n_shards, wqkv, sums):
    """The mean loss of the batch idx [B, T] -> targets tgt [B, T], and its gradients: G[k][0]
    is the gradient of parameter P[k] (G[k] is [n_shards, *P[k].shape]; the other shards' slots
    are scratch). The batch is cut into n_shards nearly equal runs of rows, one per thread.
    wqkv [L, C, 3C] and sums [n_shards] (float64) are scratch. arch: the fields of the model's
    numgpt.arch.Arch as a plain tuple (tuple(a)), named again here: numba types a plain tuple
    argument in compiled code, a namedtuple field by field in Python on every call. lanes:
    attention in lanes (_attention_lanes_fwd/_bwd) or per (sequence, head) in BLAS; both give the
    same gradients, and numgpt.parallel measures which is faster for a model on this machine.

    Only the prange is here: numba runs every array expression of a parallel function as a
    parallel region of its own (thread wake-up and barrier each), so the packing of the weights
    and the sum over the shards are serial helpers (written as array expressions, they would be
    about 50 regions a step, most of them the gradient sums)."""
    a = Arch(*arch)
    B, T = idx.shape
    dtype = wqkv.dtype
    _pack_qkv(P, slots, wqkv)
    for s in prange(n_shards):
        b0 = (s * B) // n_shards
        b1 = ((s + 1) * B) // n_shards
        w = np.empty(1, dtype=dtype)
        w[0] = (b1 - b0) / B     # this shard's share of the mean
        # s as int64: numba types a prange index as uint64 in the parallel build, and would
        # compile _shard a second time for it; with one signature both builds share one compiled
        # _shard, so the serial build does not compile it again (docs/kernels.md)
        sums[s] = _shard(idx[b0:b1].copy(), tgt[b0:b1].copy(), P, G, np.int64(s), slots, top,
                         a, lanes, wqkv, w[0])
    _add_shards(G, n_shards)
    tot = 0.0
    for s in range(n_shards):
        tot += sums[s]
    return tot / (B * T)
