"""The numba versions of numgpt.ops.REFERENCE: same functions, same arguments, same results.

Matrix products stay with NumPy's BLAS (numgpt/layers/linear.py); the kernels take everything
around them: attention, LayerNorm, bias + activation, cross-entropy, embeddings. No kernel calls
BLAS inside a parallel loop, so numba's threads and BLAS's threads never run at the same time.
"""
import threading

import numba
import numpy as np

from numgpt.arch import ACTIVATIONS as _ACT
from numgpt.layers import linear_backward, linear_forward
from numgpt.layers.layernorm import EPS as LN_EPS
from numgpt.ops import op_set

from . import _jit
from ._jit import pick, threads_allowed
from .activations import bias_act_bwd, bias_act_fwd
from .attention import softmax_causal_bwd, softmax_causal_fwd
from .dropout import dropout_backward, dropout_forward, keep_mask
from .embedding import embed_bwd, embed_fwd
from .layernorm import layernorm_bwd, layernorm_fwd
from .loss import cross_entropy_fwd_bwd

_NO_MASK = np.zeros((1, 1, 1, 1), dtype=bool)


def _chunks(n):
    """How many partial rows a sum over n rows is split into. A constant of the process, not
    numba.get_num_threads(): that one is per thread, and a count that changed from one call (or
    thread) to another would change the rounding of the sums (seen with data-parallel steps)."""
    return max(1, min(n, 4 * numba.config.NUMBA_NUM_THREADS))


# ---- embeddings ----

def embed_forward(idx, W, P):
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    B, T = idx.shape
    out = np.empty((B, T, W.shape[1]), dtype=W.dtype)
    pick(embed_fwd, out.size)(idx, W, P, out)
    return out, (idx, W.shape, P.shape)


def embed_backward(dx, cache):
    idx, wshape, pshape = cache
    dW = np.empty(wshape, dtype=dx.dtype)
    dP = np.empty(pshape, dtype=dx.dtype)
    pick(embed_bwd, dx.size)(idx, np.ascontiguousarray(dx), dW, dP)
    return dW, dP


# ---- LayerNorm ----

def layernorm_forward(x, g, b, eps=LN_EPS):
    C = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, C)
    N = x2.shape[0]
    y = np.empty_like(x2)
    mean = np.empty(N, dtype=x.dtype)
    rstd = np.empty(N, dtype=x.dtype)
    pick(layernorm_fwd, x2.size)(x2, g, b, x.dtype.type(eps), y, mean, rstd)
    return y.reshape(x.shape), (x2, g, mean, rstd, x.shape)


def layernorm_backward(dy, cache):
    x2, g, mean, rstd, shape = cache
    N, C = x2.shape
    k = _chunks(N)
    dx = np.empty_like(x2)
    dg = np.empty((k, C), dtype=x2.dtype)
    db = np.empty((k, C), dtype=x2.dtype)
    pick(layernorm_bwd, x2.size)(np.ascontiguousarray(dy).reshape(N, C), x2, g, mean, rstd, k,
                                 dx, dg, db)
    return dx.reshape(shape), dg.sum(axis=0), db.sum(axis=0)


# ---- attention ----

# The largest T x T probabilities of one layer (B * H * T * T values) kept for the backward pass:
# up to this they are stored; above it they are computed again in the backward, so that memory
# stays linear in the batch. 32 MB covers the laptop preset and the scaled one at batch 8; the
# scaled preset at batch 64 would keep 100 MB per layer and computes them again. Either way the
# products run in BLAS with the causal softmax kernels between them (kernels/attention.py).
STORE_PROBS_BYTES = 32 << 20
# Where they are computed again, a layer goes through the batch in chunks of a few sequences
# whose probabilities (and their gradient's, in the backward) take at most this much memory at a
# time; how many sequences a chunk holds is measured on this machine (_chunk_sequences): small
# chunks stay in the caches, bigger ones give BLAS more work per call.
CHUNK_BYTES = 8 << 20
# A feed-forward layer's activation a = act(h) [N, F] above this size is not kept for the
# backward but computed again from h there: one more pass of the activation kernel, for
# 100 MB less memory a block in the scaled model at batch 64 (kernels/dropout.py likewise keeps
# no masks, only their seeds; docs/benchmarks.md has the peaks). Smaller ones are kept (no cost
# to speed).
RECOMPUTE_BYTES = 32 << 20


def stores_probs(B, n_head, T, dtype):
    """Whether attention over [B, T] with n_head heads keeps its probabilities for the backward."""
    return B * n_head * T * T * np.dtype(dtype).itemsize <= STORE_PROBS_BYTES


_BMM = []  # [thread pool, BLAS controller], made on first use
_BMM_LOCK = threading.Lock()
BMM_WAYS = {}  # per kind of stack: _bmm_whole or _bmm_split, once chosen (see _bmm_way)


def _bmm(a, b, out=None):
    """np.matmul(a, b, out=out) of stacks [B, H, m, k] @ [B, H, k, n]: either whole, each small
    product split over BLAS's threads (_bmm_whole), or with the batch dealt out to one thread per
    core, each with a single BLAS thread (_bmm_split), whichever is faster for this kind of
    stack on this machine (_bmm_way).

    OpenBLAS splits each product of a stack over its threads, which at the scaled preset's
    shape (48 heads of 256 x 64 by 64 x 256) runs well below the speed of half the stack per
    core (docs/kernels.md); for small stacks, handing work to other threads costs more than it
    saves. The two ways can differ in the last bit (OpenBLAS rounds a product split over its
    threads differently), so a kind of stack keeps one way: the results do not depend on timing
    after the choice, and the choice is cached for the machine. The choice is made with BLAS on
    its own threads: under the one-BLAS-thread step (_jit.ONE_BLAS_THREAD) stacks stay whole.
    """
    B = a.shape[0]
    if B < 2 or not threads_allowed() or _jit.ONE_BLAS_THREAD:
        return np.matmul(a, b, out=out)  # (the cheap tests first: this is on every step's path)
    from numgpt.parallel import cores
    n = min(B, cores())
    if n < 2:
        return np.matmul(a, b, out=out)
    if out is None:
        out = np.empty(a.shape[:-1] + b.shape[-1:], dtype=np.result_type(a, b))
    _bmm_way(a, b, out, n)(a, b, out, n)
    return out


def _bmm_way(a, b, out, n):
    """_bmm_whole or _bmm_split for stacks like a @ b (their batch, dtype and FLOPs to within a
    factor of two): cached for this machine (beside the training step's choices), else timed in
    turns on these operands into scratch, the faster remembered and cached."""
    key = (a.shape[0], n, out.dtype.name, (2 * a.size * b.shape[-1]).bit_length())
    way = BMM_WAYS.get(key)
    if way is None:
        ways = {"whole": _bmm_whole, "split": _bmm_split}
        scratch = np.empty_like(out)
        name = _fastest_here({"stacked products": list(key)}, list(ways),
                             lambda w: ways[w](a, b, scratch, n))
        way = BMM_WAYS[key] = ways[name]
    return way


def _fastest_here(what, names, run):
    """The fastest of names for the work `what` (a dict) describes: cached for this machine
    (numgpt.parallel.fastest, beside the step choices), else each run(name) once (first calls:
    thread pools, caches), then all timed in turns for MIN_ROUNDS rounds, the medians compared.
    The stacked products' way and attention's chunk are chosen through it."""
    import time

    from numgpt import parallel

    def measure():
        for name in names:
            run(name)
        times = parallel.time_in_turns(run, names, 0.0, parallel.MIN_ROUNDS, time.perf_counter)
        return {name: float(np.median(t)) for name, t in times.items()}
    return parallel.fastest(parallel.measured_key(what, names), names, measure)[0]


def _bmm_whole(a, b, out, n):
    np.matmul(a, b, out=out)


def _bmm_split(a, b, out, n):
    """out = a @ b with the stacks' batch cut in n pieces, each on its own thread with one BLAS
    thread."""
    from concurrent.futures import wait
    with _BMM_LOCK:  # one split at a time: the BLAS thread limit is process-wide
        if not _BMM:
            from concurrent.futures import ThreadPoolExecutor

            from numgpt._threads import blas_pools
            from numgpt.parallel import cores
            _BMM[:] = [ThreadPoolExecutor(cores(), thread_name_prefix="numgpt-bmm"), blas_pools()]
        pool, blas = _BMM
        cuts = np.linspace(0, a.shape[0], n + 1).round().astype(int)
        with blas.limit(limits=1):
            jobs = [pool.submit(_bmm_job, a[i:j], b[i:j], out[i:j])
                    for i, j in zip(cuts[:-1], cuts[1:])]
            try:
                for job in jobs:
                    job.result()
            finally:  # never leave a job writing into out (or BLAS limited) behind an exception
                wait(jobs)


def _bmm_job(a, b, out):
    np.matmul(a, b, out=out)


CAUSAL_BLOCK = 64  # rows per block in _causal_bmm


def _causal_bmm(kind, a, b, out):
    """The per-head products of attention, skipping the blocks the causal mask zeroes.

    The rows are cut into blocks of CAUSAL_BLOCK; block [r0, r1) needs only part of the other
    side (with 4 blocks, 10/16 of the full product's FLOPs; 2: 3/4):
      "scores"  out [T, T] = a [T, d] b [d, T], wanted on and below the diagonal: block r needs
                columns 0 .. r1 (the rest of out is left unwritten);
      "lower"   out [T, d] = a [T, T] b [T, d] with a zero above the diagonal: inner 0 .. r1;
      "upper"   out [T, d] = a [T, T] b [T, d] with a zero below the diagonal (the transpose of
                a lower one): inner r0 .. T.
    """
    T = a.shape[-2]
    k = -(-T // CAUSAL_BLOCK)
    if k < 2:
        return _bmm(a, b, out=out)
    if out is None:
        out = np.empty(a.shape[:-1] + b.shape[-1:], dtype=np.result_type(a, b))
    cuts = [round(T * r / k) for r in range(k + 1)]
    for r0, r1 in zip(cuts[:-1], cuts[1:]):
        if kind == "scores":
            _bmm(a[..., r0:r1, :], b[..., :, :r1], out=out[..., r0:r1, :r1])
        elif kind == "lower":
            _bmm(a[..., r0:r1, :r1], b[..., :r1, :], out=out[..., r0:r1, :])
        else:
            _bmm(a[..., r0:r1, r0:], b[..., r0:, :], out=out[..., r0:r1, :])
    return out


def _head_view(a, n_head, C, part=0):
    """The [B, H, T, hs] view of columns part*C:(part+1)*C of a [B, T, *] array (of packed
    q, k, v, part 0, 1, 2): BLAS reads and writes such strided views in place, without copies."""
    B, T, _ = a.shape
    return a[:, :, part * C:(part + 1) * C].reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def _attention_probs(qkv, n_head, scale, keep, inv_keep, has_drop):
    """P [B, H, T, T]: the causal softmax of scale q k^T for the sequences of qkv [B, T, 3C]
    (zeros above the diagonal), and Pd, P with dropout (P itself without). The scores in BLAS
    (kernels/ops._causal_bmm), the softmax by its kernel."""
    C = qkv.shape[2] // 3
    q, k = _head_view(qkv, n_head, C, 0), _head_view(qkv, n_head, C, 1)
    P = _causal_bmm("scores", q, k.transpose(0, 1, 3, 2), None)   # S = q k^T, then P in place
    Pd = np.empty_like(P) if has_drop else P
    pick(softmax_causal_fwd, P.size)(P, scale, keep, inv_keep, has_drop, P, Pd)
    return P, Pd


def _attention_probs_bwd(qkv, P, att, dy, n_head, scale, keep, inv_keep, has_drop, dqkv):
    """dqkv [B, T, 3C] of attention's output gradient dy [B, T, C], given its probabilities P
    (undropped) and output att: dPd = dy v^T, dv = Pd^T dy, dS = scale P (dP - D) with
    dP = dPd * keep / (1 - p) (dPd without dropout) and D_i = dy_i . att_i per head
    (softmax_causal_bwd), dq = dS k, dk = dS^T q; the products in BLAS."""
    C = att.shape[2]
    q, k, v = (_head_view(qkv, n_head, C, i) for i in range(3))
    dyh = _head_view(dy, n_head, C)
    dPd = _causal_bmm("scores", dyh, v.transpose(0, 1, 3, 2), None)  # dy v^T
    Pd = np.empty_like(P) if has_drop else P
    pick(softmax_causal_bwd, P.size)(P, dPd, dy, att, scale, keep, inv_keep, has_drop, Pd, dPd)
    dS = dPd                                                    # overwritten in place
    _causal_bmm("upper", Pd.transpose(0, 1, 3, 2), dyh, _head_view(dqkv, n_head, C, 2))  # dv
    _causal_bmm("lower", dS, k, _head_view(dqkv, n_head, C, 0))                        # dq
    _causal_bmm("upper", dS.transpose(0, 1, 3, 2), q, _head_view(dqkv, n_head, C, 1))  # dk


def _chunked(B, chunk):
    return [(b, min(B, b + chunk)) for b in range(0, B, chunk)]


def _mask_rows(keep, has_drop, b0, b1):
    return keep[b0:b1] if has_drop else keep


def _attention_fwd_chunks(qkv, n_head, scale, keep, inv_keep, has_drop, y, chunk):
    """y = attention of qkv, chunk sequences at a time, the probabilities not kept."""
    C = y.shape[2]
    for b0, b1 in _chunked(qkv.shape[0], chunk):
        _, Pd = _attention_probs(qkv[b0:b1], n_head, scale, _mask_rows(keep, has_drop, b0, b1),
                                 inv_keep, has_drop)
        _causal_bmm("lower", Pd, _head_view(qkv[b0:b1], n_head, C, 2),
                    _head_view(y[b0:b1], n_head, C))                 # y = dropout(P) v


def _attention_bwd_chunks(qkv, att, dy, n_head, scale, keep, inv_keep, has_drop, dqkv, chunk):
    """dqkv of _attention_fwd_chunks, chunk sequences at a time: each chunk's probabilities
    computed again as the forward computed them (the same products and kernel on the same
    numbers: the same bits), then _attention_probs_bwd."""
    B = qkv.shape[0]
    for b0, b1 in _chunked(B, chunk):
        P, _ = _attention_probs(qkv[b0:b1], n_head, scale, keep, inv_keep, False)
        _attention_probs_bwd(qkv[b0:b1], P, att[b0:b1], dy[b0:b1], n_head, scale,
                             _mask_rows(keep, has_drop, b0, b1), inv_keep, has_drop,
                             dqkv[b0:b1])


CHUNKS = {}  # per kind of attention call: sequences per chunk, once chosen (_chunk_sequences)
_CHUNKS_LOCK = threading.Lock()


def _chunk_sequences(qkv, n_head, scale, keep, inv_keep, has_drop):
    """How many sequences a chunk of _attention_fwd/bwd_chunks holds for calls like this one
    (its shape, dtype, and whether the kernels and BLAS run threaded): cached for this machine
    (beside the training step's choices), else timed now: a forward and backward of the first
    sequences of qkv (as many as the largest candidate) into scratch, for 1, 2, 4, ... sequences
    a chunk up to CHUNK_BYTES of probabilities, in turns (_fastest_here)."""
    B, T, C3 = qkv.shape
    per_seq = n_head * T * T * qkv.dtype.itemsize
    most = max(1, min(B, CHUNK_BYTES // per_seq))
    sizes = [c for c in (1 << i for i in range(most.bit_length())) if c <= most]
    key = (B, n_head, T, C3, qkv.dtype.name, threads_allowed(), _jit.ONE_BLAS_THREAD)
    chunk = CHUNKS.get(key)
    if chunk is not None or len(sizes) == 1:
        return chunk or 1
    with _CHUNKS_LOCK:  # the sharded step's two threads ask at once: one measures
        chunk = CHUNKS.get(key)
        if chunk is None:
            n = sizes[-1]
            part, kp = qkv[:n], _mask_rows(keep, has_drop, 0, n)
            y = np.empty((n, T, C3 // 3), dtype=qkv.dtype)
            dqkv = np.empty_like(part)

            def run(name):
                c = int(name)
                _attention_fwd_chunks(part, n_head, scale, kp, inv_keep, has_drop, y, c)
                _attention_bwd_chunks(part, y, y, n_head, scale, kp, inv_keep, has_drop, dqkv, c)
            what = {"attention chunks": list(key[:5]), "threads": key[5], "one BLAS": key[6]}
            chunk = CHUNKS[key] = int(_fastest_here(what, [str(c) for c in sizes], run))
    return chunk


def multihead_forward(x, params, n_head, attn_dropout=0.0, resid_dropout=0.0, rng=None):
    """As numgpt.layers.attention.multihead_forward, with q, k, v from one packed product."""
    B, T, C = x.shape
    w_qkv = np.concatenate([params["w_q"], params["w_k"], params["w_v"]], axis=1)  # [C, 3C]
    qkv, c_qkv = linear_forward(x, w_qkv)                           # [B, T, 3C]
    scalar = x.dtype.type
    has_drop = attn_dropout > 0
    if has_drop:
        if rng is None:
            raise ValueError("dropout with p > 0 needs an rng (numpy Generator) or a mask")
        keep = keep_mask(rng, (B, n_head, T, T), attn_dropout)  # the reference's mask
        inv_keep = scalar(1.0 / (1.0 - attn_dropout))
    else:
        keep, inv_keep = _NO_MASK, scalar(1.0)
    y = np.empty((B, T, C), dtype=x.dtype)
    scale = scalar((C // n_head) ** -0.5)
    P, chunk = None, 0
    if stores_probs(B, n_head, T, x.dtype):  # kept for the backward
        P, Pd = _attention_probs(qkv, n_head, scale, keep, inv_keep, has_drop)
        _causal_bmm("lower", Pd, _head_view(qkv, n_head, C, 2), _head_view(y, n_head, C))
    else:                                    # computed again there, a chunk at a time
        chunk = _chunk_sequences(qkv, n_head, scale, keep, inv_keep, has_drop)
        _attention_fwd_chunks(qkv, n_head, scale, keep, inv_keep, has_drop, y, chunk)
    att = y
    cp = None
    if "w_proj" in params:
        y, cp = linear_forward(y, params["w_proj"], params["b_proj"])
    y, cd = dropout_forward(y, resid_dropout, rng)
    return y, (c_qkv, qkv, att, P, chunk, keep, inv_keep, has_drop, scale, cp, cd, n_head)


def multihead_backward(dy, cache):
    c_qkv, qkv, att, P, chunk, keep, inv_keep, has_drop, scale, cp, cd, n_head = cache
    g = {}
    dy = dropout_backward(dy, cd)
    if cp is not None:
        dy, g["w_proj"], g["b_proj"] = linear_backward(dy, cp)
    dy = np.ascontiguousarray(dy)
    dqkv = np.empty_like(qkv)
    C = att.shape[2]
    if P is not None:
        _attention_probs_bwd(qkv, P, att, dy, n_head, scale, keep, inv_keep, has_drop, dqkv)
    else:
        _attention_bwd_chunks(qkv, att, dy, n_head, scale, keep, inv_keep, has_drop, dqkv, chunk)
    dx, dw, _ = linear_backward(dqkv, c_qkv)
    g["w_q"] = np.ascontiguousarray(dw[:, :C])
    g["w_k"] = np.ascontiguousarray(dw[:, C:2 * C])
    g["w_v"] = np.ascontiguousarray(dw[:, 2 * C:])
    return dx, g


# ---- feed-forward ----

def feedforward_forward(x, params, activation="relu", dropout=0.0, rng=None):
    B, T, C = x.shape
    x2 = x.reshape(-1, C)
    h = x2 @ params["w_fc"]                  # [N, F], the bias is added by the kernel
    a = np.empty_like(h)
    pick(bias_act_fwd, h.size)(h, params["b_fc"], _ACT[activation], a)
    c2 = None
    if "w_out" in params:
        a, c2 = linear_forward(a, params["w_out"], params["b_out"])
        if h.nbytes > RECOMPUTE_BYTES:  # the backward computes act(h) again (h is kept)
            c2 = (None,) + c2[1:]
    y, cd = dropout_forward(a.reshape(B, T, -1), dropout, rng)
    return y, (x2, params["w_fc"], h, c2, cd, activation, x.shape)


def feedforward_backward(dy, cache):
    x2, w_fc, h, c2, cd, activation, shape = cache
    g = {}
    da = dropout_backward(dy, cd).reshape(h.shape[0], -1)
    if c2 is not None:
        if c2[0] is None:  # a = act(h) again: h already holds the bias, so add a zero one
            a = np.empty_like(h)  # (which rewrites h with the same values; -0.0 becomes +0.0)
            pick(bias_act_fwd, h.size)(h, np.zeros(h.shape[1], h.dtype), _ACT[activation], a)
            c2 = (a,) + c2[1:]
            del a
        da, g["w_out"], g["b_out"] = linear_backward(da, c2)
        c2 = None  # a recomputed activation is freed before dh is allocated
    k = _chunks(h.shape[0])
    dh = np.empty_like(h)
    db = np.empty((k, h.shape[1]), dtype=h.dtype)
    pick(bias_act_bwd, h.size)(np.ascontiguousarray(da), h, _ACT[activation], k, dh, db)
    g["b_fc"] = db.sum(axis=0)
    g["w_fc"] = x2.T @ dh
    return (dh @ w_fc.T).reshape(shape), g


# ---- loss ----

def cross_entropy(logits, targets, want_grad=True):
    V = logits.shape[-1]
    z = np.ascontiguousarray(logits).reshape(-1, V)
    t = np.ascontiguousarray(targets, dtype=np.int64).reshape(-1)  # in range: GPT checks ids
    dz = np.empty_like(z) if want_grad else np.empty((1, 1), dtype=z.dtype)
    losses = pick(cross_entropy_fwd_bwd, z.size)(z, t, want_grad, dz)
    return float(losses.mean()), (dz.reshape(logits.shape) if want_grad else None)


KERNELS = op_set("numba", globals())
