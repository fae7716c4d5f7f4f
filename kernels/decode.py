"""One token of generation through the whole model in one compiled call (key/value cache).

Sampling one token at a time is a chain of small matrix-vector products, a softmax over the
cached positions and a few LayerNorms per block. Done as NumPy calls, a small model spends most
of each token in Python and call overhead (the laptop model: ~60 calls per token, 3 MB of
weights); done here, the token is one call. For a big model the matrix-vector products read
every weight once per token, so they are memory-bound; see _mv for the layout that streams them
fastest.

decode_step computes what model.forward(ids, kv=cache) computes for one new position, in the
same order (equal to round-off: its exponentials are math.exp's): the embedding, then the blocks,
each numgpt.arch.block_forward with this file's pieces (_norm_in, _sublayer, _add, _norm_out; the
sublayers are _multihead_forward, whose heads each _attend to the cache, and
_feedforward_forward), then the head. It takes the block's structure as a numgpt.arch.Arch and
the parameters as DecodeWeights, the blocks' stacked along a leading layer axis (see
numgpt.generate.KVCache), both passed as plain tuples; tests/test_kernels.py holds the two
equal. sample_rows draws a token from the logits as numgpt.generate.sample_from does, and
sample_and_decode alternates the two for a run of tokens without returning to Python.
"""
import math
from typing import NamedTuple

import numba
import numpy as np

from numgpt.arch import ACT_GELU, NORM_NONE, SUB_ATTN, Arch, BlockForward
from numgpt.layers.layernorm import EPS as LN_EPS

from ._jit import OPTIONS, block_forward, pieces
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

# how _mv reads the weight matrices (the layout DecodeWeights holds them in)
BY_INPUT = 0           # W [in, out]: rows of W multiplied into the outputs (small models)
BY_OUTPUT = 1          # W.T [out, in]: one dot product over a contiguous row per output
BY_OUTPUT_THREADS = 2  # BY_OUTPUT with the rows dealt out to numba's threads
BY_INPUT_THREADS = 3   # BY_INPUT with the rows of W dealt out to numba's threads, their sums added
TRANSPOSED = (BY_OUTPUT, BY_OUTPUT_THREADS)  # the layouts that read W.T


@numba.njit(**OPTIONS)
def _add_rows(xb, W, yb, i0, i1):
    """yb = sum over i0 <= i < i1 of xb[i] W[i] (W [in, out]), four rows i per sweep: a vectorised
    multiply-add over the contiguous outputs."""
    m = W.shape[1]
    yb[:] = 0
    i = i0
    while i + 4 <= i1:
        x0, x1, x2, x3 = xb[i], xb[i + 1], xb[i + 2], xb[i + 3]
        W0, W1, W2, W3 = W[i], W[i + 1], W[i + 2], W[i + 3]
        for j in range(m):
            yb[j] += x0 * W0[j] + x1 * W1[j] + x2 * W2[j] + x3 * W3[j]
        i += 4
    while i < i1:
        xi, Wi = xb[i], W[i]
        for j in range(m):
            yb[j] += xi * Wi[j]
        i += 1


@numba.njit(parallel=True, **OPTIONS)
def _add_rows_threads(xb, W, parts):
    """parts [ROW_PARTS, out]: parts[p] = _add_rows over the p-th of ROW_PARTS contiguous pieces
    of W's rows, the pieces on numba's threads. (Nothing else in here: in a parallel function
    numba runs every array expression as a parallel loop of its own.)"""
    n = W.shape[0]
    per = (n + ROW_PARTS - 1) // ROW_PARTS
    for p in numba.prange(ROW_PARTS):
        _add_rows(xb, W, parts[p], min(n, p * per), min(n, (p + 1) * per))


@numba.njit(**OPTIONS)
def _add_rows_in_parts(xb, W, yb):
    """yb = sum_i xb[i] W[i], as the pieces' sums of _add_rows_threads added in order."""
    parts = np.empty((ROW_PARTS, W.shape[1]), W.dtype)
    _add_rows_threads(xb, W, parts)
    yb[:] = parts[0]
    for p in range(1, ROW_PARTS):
        yb += parts[p]


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
    """y[b] = x[b] @ W + bias (bias may be empty) for every row b, in one of four layouts
    (numgpt.generate.choose_layout measures which is the fastest for a model on this machine).

    BY_OUTPUT, BY_OUTPUT_THREADS (big models, W given as W.T [out, in]): each output is a dot
    product over one contiguous row, so the weights stream through memory once, front to back;
    the threaded form deals the rows out to numba's threads, since one core's outstanding loads
    do not fill the memory bandwidth (docs/benchmarks.md has the measured rates).
    BY_INPUT (small models, W [in, out] in L2): y = sum_i x_i W_i, four rows i per sweep, a
    vectorised multiply-add over contiguous outputs (_add_rows); for 128-wide layers this beats
    the dot products, whose short sums end in a horizontal add each.
    BY_INPUT_THREADS (big models, W as stored): the rows of W dealt out in ROW_PARTS contiguous
    pieces to numba's threads, each piece's sums added in order at the end (no transposed copy
    of the weights; its sums run in another order than BY_INPUT's, so the last bits differ).
    """
    B = x.shape[0]
    for b in range(B):
        xb = x[b]
        yb = y[b]
        if layout == BY_OUTPUT_THREADS:
            _dot_rows_threads(xb, W, bias, yb)
        elif layout == BY_OUTPUT:
            _dot_rows(xb, W, bias, yb, 0, W.shape[0])
        else:
            if layout == BY_INPUT_THREADS:
                _add_rows_in_parts(xb, W, yb)
            else:
                _add_rows(xb, W, yb, 0, W.shape[0])
            if bias.size:
                yb += bias


_layernorm_rows = layernorm_fwd.serial  # the training kernel's forward, on the calling thread


@numba.njit(**OPTIONS)
def _layernorm(x, g, b, out):
    """LayerNorm of each row of x [B, C] into out, by kernels/layernorm.py's forward."""
    stats = np.empty((2, x.shape[0]), x.dtype)  # mean and 1/std, not needed here
    _layernorm_rows(x, g, b, x.dtype.type(LN_EPS), out, stats[0], stats[1])


@numba.njit(**OPTIONS)
def _attend(q, Kh, Vh, t, scale, s, yh):
    """One head of one new position against the cache: yh [hs] = sum_p softmax(s)_p v_p over the
    positions p <= t, s_p = scale q . k_p (q [hs]; Kh, Vh [block, hs], rows 0..t filled; s [t + 1]
    is scratch)."""
    scalar = yh.dtype.type
    n4 = (t + 1) - (t + 1) % 4
    for p in range(0, n4, 4):  # s_p = scale * q . k_p, four positions per sweep of q
        k0, k1, k2, k3 = Kh[p], Kh[p + 1], Kh[p + 2], Kh[p + 3]
        a0 = scalar(0)
        a1 = scalar(0)
        a2 = scalar(0)
        a3 = scalar(0)
        for d in range(q.shape[0]):
            qd = q[d]
            a0 += qd * k0[d]
            a1 += qd * k1[d]
            a2 += qd * k2[d]
            a3 += qd * k3[d]
        s[p], s[p + 1], s[p + 2], s[p + 3] = a0 * scale, a1 * scale, a2 * scale, a3 * scale
    for p in range(n4, t + 1):
        kp = Kh[p]
        acc = scalar(0)
        for d in range(q.shape[0]):
            acc += q[d] * kp[d]
        s[p] = acc * scale
    mx = scalar(-np.inf)
    for p in range(t + 1):
        mx = max(mx, s[p])
    tot = scalar(0)
    for p in range(t + 1):
        e = math.exp(s[p] - mx)
        s[p] = e
        tot += e
    yh[:] = 0
    for p in range(t + 1):   # y = sum_p softmax(s)_p v_p
        w = s[p]
        vp = Vh[p]
        for d in range(yh.shape[0]):
            yh[d] += w * vp[d]
    inv = scalar(1) / tot
    for d in range(yh.shape[0]):
        yh[d] *= inv


@numba.njit(**OPTIONS)
def _attend_head(qkv, K, V, t, scale, s, y, b, hd):
    """Head hd of row b: _attend with its query from qkv [B, 3C], its cache K[b, hd], V[b, hd],
    its output into y [B, C]."""
    hs = K.shape[3]
    o = hd * hs
    _attend(qkv[b, o:o + hs], K[b, hd], V[b, hd], t, scale, s, y[b, o:o + hs])


@numba.njit(parallel=True, **OPTIONS)
def _attend_heads_threads(qkv, K, V, t, scale, s, y):
    """_attend_head for every (row, head), dealt out to numba's threads (s [B * H, t + 1]: each its
    own scratch). Each head is one thread's, so the result is the serial loop's bit for bit; for
    a big model the cached keys and values a token reads (L x 2 x H x t x hs numbers) are worth
    two cores' memory bandwidth."""
    H = K.shape[1]
    for bh in numba.prange(y.shape[0] * H):
        _attend_head(qkv, K, V, t, scale, s[bh], y, bh // H, bh % H)


@numba.njit(**OPTIONS)
def _multihead_forward(h, w_qkv, w_proj, b_proj, K, V, t, n_head, attn_proj, layout, qkv, s, att,
                       y):
    """y [B, C] = the attention sublayer of one new position per row of h [B, C]
    (layers.attention.multihead_forward on the last row): qkv = h [w_q w_k w_v]; the new k, v are
    stored at t in K, V [B, H, block, hs]; every head attends over positions 0..t (_attend; on
    numba's threads in the threaded layouts) into att; y = att w_proj + b_proj (attn_proj), else
    y = att. qkv, s ([B * H or 1, t + 1]) and att are scratch; h is read before y is written,
    so y may be h."""
    B, C = h.shape
    hs = C // n_head
    scale = y.dtype.type(1 / math.sqrt(hs))
    _mv(h, w_qkv, w_qkv[0, :0], qkv, layout)
    for b in range(B):
        for hd in range(n_head):
            o = hd * hs
            K[b, hd, t] = qkv[b, C + o:C + o + hs]
            V[b, hd, t] = qkv[b, 2 * C + o:2 * C + o + hs]
    if s.shape[0] > 1:
        _attend_heads_threads(qkv, K, V, t, scale, s, att)
    else:
        for b in range(B):
            for hd in range(n_head):
                _attend_head(qkv, K, V, t, scale, s[0], att, b, hd)
    if attn_proj:
        _mv(att, w_proj, b_proj, y, layout)
    else:
        y[:] = att


@numba.njit(**OPTIONS)
def _activate(f, activation):
    """f = act(f) in place: ReLU max(f, 0) or GELU's tanh form (kernels/activations.py)."""
    scalar = f.dtype.type
    gc, ga, g_half, g_one, g_two = gelu_consts(f)  # GELU's constants in the dtype
    for b in range(f.shape[0]):
        for j in range(f.shape[1]):
            v = f[b, j]
            if activation == ACT_GELU:
                u = gc * (v + ga * v * v * v)
                f[b, j] = g_half * v * (g_one + tanh_by_exp(u, g_one, g_two))
            else:
                f[b, j] = max(v, scalar(0))


@numba.njit(**OPTIONS)
def _feedforward_forward(h, w_fc, b_fc, w_out, b_out, activation, ffn_proj, layout, f, y):
    """y [B, C] = the feed-forward sublayer of h [B, C] (layers.feedforward.feedforward_forward):
    f = act(h w_fc + b_fc); y = f w_out + b_out (ffn_proj), else y = f. f [B, F] is scratch; h is
    read before y is written, so y may be h."""
    _mv(h, w_fc, b_fc, f, layout)
    _activate(f, activation)
    if ffn_proj:
        _mv(f, w_out, b_out, y, layout)
    else:
        y[:] = f


class DecodeWeights(NamedTuple):
    """decode_step's parameters (numgpt.generate.KVCache builds them): the blocks' stacked along a
    leading layer axis. Matrices are [L, in, out] as stored (BY_INPUT, BY_INPUT_THREADS) or
    transposed to [L, out, in] (BY_OUTPUT and BY_OUTPUT_THREADS, w_head [V, C]; see _mv,
    TRANSPOSED). The sublayers' LayerNorms are by sublayer (numgpt.arch.SUBLAYERS: ln_g[l, j] is
    block l's sublayer j's). Absent parts have size 0 (as [L, 0, 0], or w_fc with 0 outputs):
    w_proj (no output projection), w_fc (no feed-forward), w_out (feed-forward without its
    second linear); absent LayerNorms are zeros."""
    tok_emb: np.ndarray   # [V, C]
    pos_emb: np.ndarray   # [block, C]
    ln_g: np.ndarray      # [L, N_SUB, C]: ln1, ln2
    ln_b: np.ndarray
    w_qkv: np.ndarray     # [L, C, 3C]: w_q, w_k, w_v side by side
    w_proj: np.ndarray    # [L, C, C]
    b_proj: np.ndarray    # [L, C]
    w_fc: np.ndarray      # [L, C, F]
    b_fc: np.ndarray      # [L, F]
    w_out: np.ndarray     # [L, F, C]
    b_out: np.ndarray     # [L, C]
    lnf_g: np.ndarray     # [C]
    lnf_b: np.ndarray
    w_head: np.ndarray    # [C, V]
    b_head: np.ndarray    # [V]


class _Layer(NamedTuple):
    """What the pieces of a block read for one layer (st, in numgpt.arch.block_forward's terms):
    the Arch; the layer's weights (its slices of DecodeWeights); its caches K, V [B, H, block, hs]
    and the position t; the weights' layout; the scratch arrays h [B, C] (a sublayer's input),
    qkv [B, 3C], s (the scores, see _multihead_forward), att [B, C], f [B, F] and y [B, C] (a
    sublayer's output). Flat, not holding the DecodeWeights: numba counts a reference to every
    array of a tuple each time the tuple is read out of another."""
    a: Arch
    ln_g: np.ndarray     # [N_SUB, C]
    ln_b: np.ndarray
    w_qkv: np.ndarray
    w_proj: np.ndarray
    b_proj: np.ndarray
    w_fc: np.ndarray
    b_fc: np.ndarray
    w_out: np.ndarray
    b_out: np.ndarray
    K: np.ndarray
    V: np.ndarray
    t: int
    layout: int
    h: np.ndarray
    qkv: np.ndarray
    s: np.ndarray
    att: np.ndarray
    f: np.ndarray
    y: np.ndarray


# ---- a block's pieces: numgpt.arch.block_forward puts them together ----

@numba.njit(inline="always", **OPTIONS)
def _norm_in(st, j, x):
    """Pre-norm: LN_j(x) into st.h."""
    _layernorm(x, st.ln_g[j], st.ln_b[j], st.h)
    return st.h


@numba.njit(inline="always", **OPTIONS)
def _sublayer(st, j, h):
    """Attention (j = SUB_ATTN) or the feed-forward of h, into st.y."""
    a = st.a
    if j == SUB_ATTN:
        _multihead_forward(h, st.w_qkv, st.w_proj, st.b_proj, st.K, st.V, st.t, a.n_head,
                           a.attn_proj, st.layout, st.qkv, st.s, st.att, st.y)
    else:
        _feedforward_forward(h, st.w_fc, st.b_fc, st.w_out, st.b_out, a.activation, a.ffn_proj,
                             st.layout, st.f, st.y)
    return st.y


@numba.njit(inline="always", **OPTIONS)
def _add(st, x, f):
    """x + f, into x."""
    x += f
    return x


@numba.njit(inline="always", **OPTIONS)
def _norm_out(st, j, x):
    """Post-norm: x = LN_j(x), in place (through st.h)."""
    st.h[:] = x
    _layernorm(st.h, st.ln_g[j], st.ln_b[j], x)
    return x


FORWARD = pieces("decode.FORWARD", BlockForward(
    norm_in=_norm_in, sublayer=_sublayer, add=_add, norm_out=_norm_out))


@numba.njit(**OPTIONS)
def decode_step(ids, t, arch, weights, K, V, layout, logits):
    """Logits [B, V] of the next token after ids [B] placed at position t; fills K, V at t.

    arch: the fields of the model's numgpt.arch.Arch, weights: those of its DecodeWeights, as
    plain tuples (tuple(a)), named again here: numba types a plain tuple argument in compiled
    code, a namedtuple field by field in Python on every call. K, V: [L, B, H, block, hs]
    caches (positions < t filled). layout: of the weights, BY_INPUT, BY_OUTPUT, BY_OUTPUT_THREADS
    or BY_INPUT_THREADS (see _mv; the threaded two run the heads' attention on the threads too).
    The blocks are numgpt.arch.block_forward with the pieces above, as in GPT._block_forward.
    """
    a = Arch(*arch)
    w = DecodeWeights(*weights)
    B = ids.shape[0]
    C = w.tok_emb.shape[1]
    dtype = w.tok_emb.dtype
    x = np.empty((B, C), dtype)
    h = np.empty((B, C), dtype)
    y = np.empty((B, C), dtype)
    att = np.empty((B, C), dtype)
    qkv = np.empty((B, 3 * C), dtype)
    f = np.empty((B, w.b_fc.shape[1]), dtype)
    threads = layout == BY_OUTPUT_THREADS or layout == BY_INPUT_THREADS
    s = np.empty((B * a.n_head if threads else 1, t + 1), dtype)
    for b in range(B):   # x = tok_emb[ids] + pos_emb[t]
        for c in range(C):
            x[b, c] = w.tok_emb[ids[b], c] + w.pos_emb[t, c]
    for l in range(a.n_layer):
        st = _Layer(a, w.ln_g[l], w.ln_b[l], w.w_qkv[l], w.w_proj[l], w.b_proj[l], w.w_fc[l],
                    w.b_fc[l], w.w_out[l], w.b_out[l], K[l], V[l], t, layout, h, qkv, s, att, f, y)
        x = block_forward(a, FORWARD, st, x)
    if a.norm != NORM_NONE:   # the head: logits = LN_f(x) w_head + b_head
        h[:] = x
        _layernorm(h, w.lnf_g, w.lnf_b, x)
    _mv(x, w.w_head, w.b_head, logits, layout)


@numba.njit(cache=OPTIONS["cache"], nogil=True)
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


@numba.njit(**OPTIONS)
def sample_and_decode(t, arch, weights, K, V, layout, logits, temperature, u, out):
    """A run of tokens in one call (numgpt.generate.KVCache.run): for k < n, out[k] [B] = the
    tokens drawn from logits with the uniforms u[k] (sample_rows), then, unless the cache is
    full (t == block), logits = decode_step(out[k]) at position t and t += 1. Returns t."""
    block = K.shape[3]
    for k in range(out.shape[0]):
        sample_rows(logits, temperature, u[k], out[k])
        if t == block:
            break
        decode_step(out[k], t, arch, weights, K, V, layout, logits)
        t += 1
    return t
