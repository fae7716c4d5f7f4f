"""LayerNorm over the last dimension: y = (x - mean) / sqrt(var + eps) * g + b.

Derivation: docs/derivations.md#layernorm
Gradient check: tests/test_layers.py::test_layernorm_grad
"""
import numpy as np

EPS = 1e-5  # in var + eps, torch.nn.LayerNorm's default; the kernels, the fused step and the decoder
#             use this one too


def layernorm_forward(x, g, b, eps=EPS):
    """x: [..., C], g: [C], b: [C] -> y [..., C], cache

    The variance is the biased one (divide by C), as in torch.nn.LayerNorm.
    """
    mu = x.mean(axis=-1, keepdims=True)             # [..., 1]
    xc = x - mu                                     # [..., C]  (x~ in the docs)
    var = (xc * xc).mean(axis=-1, keepdims=True)    # [..., 1]
    rstd = 1.0 / np.sqrt(var + eps)                 # [..., 1]
    xhat = xc * rstd                                # [..., C]
    y = xhat * g + b
    return y, (xhat, rstd, g)


def layernorm_backward(dy, cache):
    """With xhat the normalised input and dxhat = dy * g:

        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        dg = sum over leading dims of dy * xhat,   db = sum over leading dims of dy

    (means over the last dimension; docs/derivations.md#layernorm)
    dy: [..., C] -> dx [..., C], dg [C], db [C]
    """
    xhat, rstd, g = cache
    C = xhat.shape[-1]
    dxhat = dy * g
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    dy2 = dy.reshape(-1, C)
    dg = (dy2 * xhat.reshape(-1, C)).sum(axis=0)
    db = dy2.sum(axis=0)
    return dx, dg, db
