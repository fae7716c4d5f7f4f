"""Token and position embeddings: a table lookup forward, a scatter-add backward.

Derivation: docs/derivations.md#embedding
Gradient check: tests/test_layers.py::test_embedding_grad
"""
import numpy as np


def embedding_forward(idx, W):
    """Look up rows of a table.

    idx: [B, T] integer ids in [0, V)
    W:   [V, C] the table
    returns out [B, T, C] = W[idx], cache
    """
    out = W[idx]  # [B, T, C]
    return out, (idx, W.shape)


def embedding_backward(dout, cache):
    """dW[v] = sum of dout[b, t] over every (b, t) with idx[b, t] == v.

    In the forward pass row v was copied to every position that holds token v,
    so now each of those positions sends its gradient back to row v (docs/derivations.md#embedding).

    dout: [B, T, C] -> dW [V, C]
    """
    idx, shape = cache
    dW = np.zeros(shape, dtype=dout.dtype)
    np.add.at(dW, idx.reshape(-1), dout.reshape(-1, shape[1]))
    return dW


def position_forward(T, P):
    """Position embedding: the first T rows of P, shared by every sequence.

    P: [block_size, C] -> out [T, C] (broadcast over the batch when added)
    """
    return P[:T], (T, P.shape)


def position_backward(dout, cache):
    """dP[t] = sum over the batch of dout[b, t]; rows past T get nothing.

    dout: [B, T, C] -> dP [block_size, C]
    """
    T, shape = cache
    dP = np.zeros(shape, dtype=dout.dtype)
    dP[:T] = dout.sum(axis=0)
    return dP
