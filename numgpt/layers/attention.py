"""Causal softmax self-attention: one head, many heads, and the multi-head layer around them.

Derivation: docs/derivations.md#attention
Gradient checks: tests/test_layers.py::test_attention_core_grad, test_multihead_grad
"""
import numpy as np

from .dropout import dropout_backward, dropout_forward
from .linear import linear_backward, linear_forward


def causal_mask(T, T_keys=None):
    """[T, T_keys] bool, True where key position j is in the future of query i. The queries are
    the last T of the T_keys positions (all of them by default, T_keys = T): query i sits at
    position i + T_keys - T, so j is masked when j > i + T_keys - T."""
    T_keys = T if T_keys is None else T_keys
    return np.triu(np.ones((T, T_keys), dtype=bool), k=1 + T_keys - T)


def attention_forward(q, k, v, attn_dropout=0.0, rng=None):
    """Scaled causal attention of every head at once.

    q, k, v: [B, H, T, hs]  ->  out [B, H, T, hs], cache
      s = q k^T / sqrt(hs)            [B, H, T, T]
      s[..., i, j] = -inf for j > i   (a position sees only itself and the past)
      p = softmax(s) over j           [B, H, T, T]   (P in docs/derivations.md)
      pd = dropout(p)                 [B, H, T, T]   (P~: p after dropout, = p when it is off)
      out = pd v                      [B, H, T, hs]
    One causal head is the case H == 1. The cache keeps p, pd, the scale and mask_scale, the keep-mask
    divided by (1 - attn_dropout) that dropout_forward returns (None when dropout is off).
    k and v may hold more positions than q (the decoder's cache: the queries are then the last
    positions, causal_mask(T, T_keys)); the backward pass is for the square case.
    """
    hs = q.shape[-1]
    scale = q.dtype.type(hs ** -0.5)
    s = (q @ k.swapaxes(-1, -2)) * scale
    s[..., causal_mask(q.shape[-2], k.shape[-2])] = -np.inf
    s -= s.max(axis=-1, keepdims=True)   # stable softmax: the diagonal is always finite
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    pd, mask_scale = dropout_forward(p, attn_dropout, rng)
    out = pd @ v
    return out, (q, k, v, p, pd, mask_scale, scale)


def attention_backward(dout, cache):
    """dout: [B, H, T, hs] -> dq, dk, dv [B, H, T, hs]

    In the forward pass out = pd v, so now dpd = dout v^T and dv = pd^T dout (dX is dL/dX).
    Dropout passes dp = dpd * mask / (1 - attn_dropout). Softmax rows give
      ds = p * (dp - sum_j(dp * p))           (masked entries have p = 0, so ds = 0 there)
    and s = scale * q k^T gives dq = scale * ds k, dk = scale * ds^T q.
    (docs/derivations.md#attention)
    """
    q, k, v, p, pd, mask_scale, scale = cache
    dpd = dout @ v.swapaxes(-1, -2)                      # [B, H, T, T]
    dv = pd.swapaxes(-1, -2) @ dout                      # [B, H, T, hs]
    dp = dropout_backward(dpd, mask_scale)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # [B, H, T, T]
    ds *= scale
    dq = ds @ k
    dk = ds.swapaxes(-1, -2) @ q
    return dq, dk, dv


def split_heads(x, n_head):
    """[B, T, H*hs] -> [B, H, T, hs]"""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    """[B, H, T, hs] -> [B, T, H*hs] (heads concatenated along the channels)"""
    B, H, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * hs)


def multihead_forward(x, params, n_head, attn_dropout=0.0, resid_dropout=0.0, rng=None):
    """Multi-head causal self-attention.

    x: [B, T, C]; params: dict with w_q, w_k, w_v [C, C] (no bias; head h owns columns h*hs:(h+1)*hs)
    and, when present, w_proj [C, C], b_proj [C] (the output projection).
    -> y [B, T, C], cache

      q, k, v = x w_q, x w_k, x w_v, split into n_head heads of size hs = C / n_head
      heads = attention(q, k, v)          (each head on its own slice)
      y = dropout(concat(heads) w_proj + b_proj)
    """
    q, cq = linear_forward(x, params["w_q"])
    k, ck = linear_forward(x, params["w_k"])
    v, cv = linear_forward(x, params["w_v"])
    o, ca = attention_forward(split_heads(q, n_head), split_heads(k, n_head),
                              split_heads(v, n_head), attn_dropout, rng)
    y = merge_heads(o)
    cp = None
    if "w_proj" in params:
        y, cp = linear_forward(y, params["w_proj"], params["b_proj"])
    y, cd = dropout_forward(y, resid_dropout, rng)
    return y, (cq, ck, cv, ca, cp, cd, n_head)


def multihead_backward(dy, cache):
    """dy: [B, T, C] -> dx [B, T, C], grads dict (same keys as the parameters)

    Runs the forward steps in reverse; x fed q, k and v, so dx is the sum of their three input gradients.
    (docs/derivations.md#multi-head-split-merge-and-the-projections)
    """
    cq, ck, cv, ca, cp, cd, n_head = cache
    g = {}
    dy = dropout_backward(dy, cd)
    if cp is not None:
        dy, g["w_proj"], g["b_proj"] = linear_backward(dy, cp)
    dq, dk, dv = attention_backward(split_heads(dy, n_head), ca)
    dx, g["w_q"], _ = linear_backward(merge_heads(dq), cq)
    dxk, g["w_k"], _ = linear_backward(merge_heads(dk), ck)
    dxv, g["w_v"], _ = linear_backward(merge_heads(dv), cv)
    dx += dxk
    dx += dxv
    return dx, g
