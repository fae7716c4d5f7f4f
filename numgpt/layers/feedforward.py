"""Position-wise feed-forward: y = dropout(act(x W1 + b1) W2 + b2), or act(x W1 + b1) with no W2.

The ladder's `ffn` rung uses the short form (Linear(C, C) + ReLU); later rungs use C -> 4C -> C.

Derivation: docs/derivations.md#feed-forward
Gradient check: tests/test_layers.py::test_feedforward_grad
"""
from .activations import ACTIVATIONS
from .dropout import dropout_backward, dropout_forward
from .linear import linear_backward, linear_forward


def feedforward_forward(x, params, activation="relu", dropout=0.0, rng=None):
    """x: [B, T, C]; params: w_fc [C, F], b_fc [F], and optionally w_out [F, C], b_out [C] -> y [B, T, C], cache

    F is the hidden width (ffn_mult * C); dropout is the drop probability on the sublayer's output.
    """
    act_f, _ = ACTIVATIONS[activation]
    h, c1 = linear_forward(x, params["w_fc"], params["b_fc"])
    a, ca = act_f(h)
    c2 = None
    if "w_out" in params:
        a, c2 = linear_forward(a, params["w_out"], params["b_out"])
    y, cd = dropout_forward(a, dropout, rng)
    return y, (c1, ca, c2, cd, activation)


def feedforward_backward(dy, cache):
    """dy: [B, T, C] -> dx [B, T, C], grads dict: the chain rule through dropout, W2, the activation, W1.

    (docs/derivations.md#feed-forward)
    """
    c1, ca, c2, cd, activation = cache
    _, act_b = ACTIVATIONS[activation]
    g = {}
    da = dropout_backward(dy, cd)
    if c2 is not None:
        da, g["w_out"], g["b_out"] = linear_backward(da, c2)
    dh = act_b(da, ca)
    dx, g["w_fc"], g["b_fc"] = linear_backward(dh, c1)
    return dx, g
