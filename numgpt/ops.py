"""The operations the model is assembled from, as one swappable set.

REFERENCE is the plain NumPy layers of numgpt/layers (the readable version, checked by finite
differences); numgpt.kernels.ops.KERNELS is the numba set with the same functions and the same
results (tests/test_kernels.py holds them equal). GPT(cfg) uses the kernels when cfg.kernels is
true.
"""
from types import SimpleNamespace

# the layer functions named in OPS below are picked out of globals() by op_set
from .layers import (cross_entropy_backward, cross_entropy_forward,  # noqa: F401
                     embedding_backward,
                     embedding_forward, feedforward_backward, feedforward_forward,
                     layernorm_backward, layernorm_forward, multihead_backward, multihead_forward,
                     position_backward, position_forward)


def embed_forward(idx, W, P):
    """x = W[idx] + P[:T]: [B, T] ids -> [B, T, C]"""
    tok, c_tok = embedding_forward(idx, W)
    pos, c_pos = position_forward(idx.shape[1], P)
    return tok + pos, (c_tok, c_pos)


def embed_backward(dx, cache):
    """Both tables receive dx: -> dW, dP"""
    c_tok, c_pos = cache
    return embedding_backward(dx, c_tok), position_backward(dx, c_pos)


def cross_entropy(logits, targets, want_grad=True):
    """(mean loss, dlogits or None)"""
    loss, cache = cross_entropy_forward(logits, targets)
    return loss, (cross_entropy_backward(cache) if want_grad else None)


OPS = ["embed_forward", "embed_backward", "layernorm_forward", "layernorm_backward",
       "multihead_forward", "multihead_backward", "feedforward_forward", "feedforward_backward",
       "cross_entropy"]


def op_set(name, namespace):
    """The operations named in OPS, taken from namespace (a module's globals()), as one set.
    table_forward / table_backward (the bigram's lookup) are the reference ones in every set."""
    return SimpleNamespace(name=name, table_forward=embedding_forward,
                           table_backward=embedding_backward, **{k: namespace[k] for k in OPS})


REFERENCE = op_set("numpy", globals())


def get_ops(use_kernels):
    if not use_kernels:
        return REFERENCE
    from numgpt.kernels.ops import KERNELS
    return KERNELS
