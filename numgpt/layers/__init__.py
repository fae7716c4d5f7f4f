"""Every layer of numgpt as a forward/backward pair.

`out, cache = X_forward(...)` computes the layer and keeps what its backward needs;
`dx, ... = X_backward(dout, cache)` returns the gradients. All functions are dtype-generic:
float32 for training, float64 for gradient checks. Each backward's docstring names the equation
it implements; docs/derivations.md derives it.
"""
from .activations import gelu_backward, gelu_forward, relu_backward, relu_forward
from .attention import (attention_backward, attention_forward, multihead_backward,
                        multihead_forward)
from .dropout import dropout_backward, dropout_forward
from .embedding import (embedding_backward, embedding_forward, position_backward,
                        position_forward)
from .feedforward import feedforward_backward, feedforward_forward
from .layernorm import layernorm_backward, layernorm_forward
from .linear import linear_backward, linear_forward
from .loss import cross_entropy_backward, cross_entropy_forward, log_softmax, softmax
from .residual import residual_backward, residual_forward

__all__ = [
    "attention_backward", "attention_forward", "cross_entropy_backward", "cross_entropy_forward",
    "dropout_backward", "dropout_forward", "embedding_backward", "embedding_forward",
    "feedforward_backward", "feedforward_forward", "gelu_backward", "gelu_forward",
    "layernorm_backward", "layernorm_forward", "linear_backward", "linear_forward",
    "log_softmax", "multihead_backward", "multihead_forward", "position_backward",
    "position_forward", "relu_backward", "relu_forward", "residual_backward", "residual_forward",
    "softmax",
]
