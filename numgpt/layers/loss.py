"""Softmax cross-entropy, mean over tokens.

Derivation: docs/derivations.md#cross-entropy
Gradient check: tests/test_layers.py::test_cross_entropy_grad
"""
import numpy as np


def log_softmax(z, axis=-1):
    """Stable log-softmax: z - max - log(sum(exp(z - max)))."""
    m = z.max(axis=axis, keepdims=True)
    s = z - m
    return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))


def softmax(z, axis=-1):
    """Stable softmax (subtracts the row maximum before exp)."""
    m = z.max(axis=axis, keepdims=True)
    e = np.exp(z - m)
    return e / e.sum(axis=axis, keepdims=True)


def cross_entropy_forward(logits, targets):
    """logits: [..., V], targets: [...] integer ids -> loss (python float), cache

    loss = mean over all N positions of -log softmax(logits)[target]
    """
    V = logits.shape[-1]
    z = logits.reshape(-1, V)              # [N, V]
    t = targets.reshape(-1)                # [N]
    logp = log_softmax(z)                  # [N, V]
    N = z.shape[0]
    loss = -logp[np.arange(N), t].mean()
    return float(loss), (logp, t, logits.shape)


def cross_entropy_backward(cache, dloss=1.0):
    """dlogits = dloss * (softmax(logits) - onehot(target)) / N (docs/derivations.md#cross-entropy)

    dloss: dL/dloss, the gradient of whatever the mean loss feeds (1 when it is the final loss).
    returns dlogits with the shape of logits
    """
    logp, t, shape = cache
    N = logp.shape[0]
    d = np.exp(logp)
    d[np.arange(N), t] -= 1.0
    d *= logp.dtype.type(dloss / N)
    return d.reshape(shape)
