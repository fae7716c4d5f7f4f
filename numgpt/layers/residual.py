"""Residual connection: y = x + f(x).

Derivation: docs/derivations.md#residual
Gradient check: tests/test_layers.py::test_residual_grad
"""


def residual_forward(x, fx):
    """x, fx: [B, T, C] -> y = x + fx"""
    return x + fx


def residual_backward(dy):
    """dy/dx = I and dy/dfx = I, so both branches receive dy unchanged: returns (dx_skip, dfx).

    The skip branch's gradient is then added to whatever f's backward sends to x
    (docs/derivations.md#residual).
    """
    return dy, dy
