"""Inverted dropout: zero each element with probability p, scale the survivors by 1/(1-p).

The mask comes from an explicit numpy Generator, so a gradient check can replay it exactly
by handing the same seed to every evaluation.

Derivation: docs/derivations.md#dropout
Gradient check: tests/test_layers.py::test_dropout_grad
"""
import numpy as np


def dropout_forward(x, p, rng=None, mask=None):
    """x: [...] -> y [...], cache (the scaled mask, or None when dropout is off)

    p: drop probability in [0, 1). rng: numpy Generator used to draw the mask.
    mask: optional precomputed keep-mask (bool or 0/1, same shape as x) that overrides rng.
    With p == 0 and no mask the layer is the identity (evaluation mode).
    """
    if mask is None:
        if p == 0.0:
            return x, None
        if rng is None:
            raise ValueError("dropout with p > 0 needs an rng (numpy Generator) or a mask")
        mask = rng.random(x.shape, dtype=np.float32) >= p
    scale = mask.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * scale, scale


def dropout_backward(dy, scale):
    """dx = dy * mask / (1 - p): the same elements pass, with the same scale (docs/derivations.md#dropout)"""
    if scale is None:
        return dy
    return dy * scale
