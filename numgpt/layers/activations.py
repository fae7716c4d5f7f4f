"""Elementwise activations: ReLU and GELU (tanh form, as GPT-2 and torch.nn.GELU(approximate='tanh')).

Derivation: docs/derivations.md#relu and docs/derivations.md#gelu
Gradient check: tests/test_layers.py::test_relu_grad, test_gelu_grad
"""
import math

import numpy as np

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def relu_forward(x):
    """y = max(x, 0). x: [...] -> y [...]"""
    mask = x > 0
    return x * mask, mask


def relu_backward(dy, mask):
    """dx = dy * 1[x > 0] (docs/derivations.md#relu)"""
    return dy * mask


def gelu_forward(x):
    """y = 0.5 x (1 + tanh(u)),  u = c (x + a x^3),  c = sqrt(2/pi), a = 0.044715. x: [...] -> y [...]"""
    t = np.tanh(_GELU_C * (x + _GELU_A * x * x * x))
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_backward(dy, cache):
    """dx = dy * (0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2)) with t = tanh(u) (docs/derivations.md#gelu)"""
    x, t = cache
    dudx = _GELU_C * (1.0 + 3.0 * _GELU_A * x * x)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dudx)


ACTIVATIONS = {
    "relu": (relu_forward, relu_backward),
    "gelu": (gelu_forward, gelu_backward),
}
