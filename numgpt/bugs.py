"""A catalogue of the classic backward-pass mistakes, each a wrong twin of one real function, and
the means to swap any function of numgpt for another for a while.

    with plant("layernorm_no_var"):     # every use of layernorm_backward now runs the wrong twin
        run_report(...)                 # and the LayerNorm check (and the models with LN) fail

`swap` rebinds a function everywhere numgpt refers to it (module globals, the reference op set
in numgpt/ops.py, the activation table) and restores every binding on exit, so the real code
is never edited. The exercises use the same swap to run a learner's backward passes.
`python -m numgpt.gradcheck --break BUG` runs the report with one bug planted;
tests/test_bugs.py shows that the report catches every entry.
"""
import contextlib
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from . import layers
from .layers.activations import _GELU_A, _GELU_C
from .layers.dropout import dropout_backward


def _numgpt_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "numgpt" or name.startswith("numgpt."))]


@contextlib.contextmanager
def swap(replacements):
    """Within the block, every reference numgpt holds to layers.<name> calls replacements[name].

    replacements: dict name -> function, name one of the functions of numgpt.layers (for example
    "linear_backward"), or "AdamW.step" for the optimizer's update. Bindings rebound: module
    globals of numgpt.*, attributes of op sets (SimpleNamespace) held by those modules, and tuple
    entries of dicts such as layers.activations.ACTIVATIONS.
    """
    undo = []
    try:
        for name, new in replacements.items():
            if name == "AdamW.step":
                from .optim import AdamW
                undo.append((setattr, AdamW, "step", AdamW.step))
                AdamW.step = new
                continue
            old = getattr(layers, name, None)
            if not callable(old):
                raise KeyError(f"numgpt.layers has no function {name!r}")
            for mod in _numgpt_modules():
                for key, val in list(vars(mod).items()):
                    if val is old:
                        undo.append((setattr, mod, key, old))
                        setattr(mod, key, new)
                    elif isinstance(val, SimpleNamespace):
                        for k, v in list(vars(val).items()):
                            if v is old:
                                undo.append((setattr, val, k, old))
                                setattr(val, k, new)
                    elif isinstance(val, dict) and not key.startswith("__"):
                        for k, v in list(val.items()):
                            if isinstance(v, tuple) and any(e is old for e in v):
                                undo.append((dict.__setitem__, val, k, v))
                                val[k] = tuple(new if e is old else e for e in v)
        yield
    finally:
        for fn, obj, key, val in reversed(undo):
            fn(obj, key, val)


# ---- the wrong twins ----

def embedding_backward_fancy_index(dout, cache):
    """dW[idx] += dout: a buffered fancy-index add keeps one contribution per repeated id."""
    idx, shape = cache
    dW = np.zeros(shape, dtype=dout.dtype)
    dW[idx.reshape(-1)] += dout.reshape(-1, shape[1])
    return dW


def attention_backward_no_rowsum(dout, cache):
    """The softmax backward as ds = p * dp, without its row-sum term - sum_j(dp * p)."""
    q, k, v, p, pd, mask_scale, scale = cache
    dpd = dout @ v.swapaxes(-1, -2)
    dv = pd.swapaxes(-1, -2) @ dout
    dp = dropout_backward(dpd, mask_scale)
    ds = p * dp * scale
    return ds @ k, ds.swapaxes(-1, -2) @ q, dv


def attention_backward_dropped_probs(dout, cache):
    """The softmax backward through the dropped-out probabilities pd instead of p."""
    q, k, v, p, pd, mask_scale, scale = cache
    dpd = dout @ v.swapaxes(-1, -2)
    dv = pd.swapaxes(-1, -2) @ dout
    dp = dropout_backward(dpd, mask_scale)
    ds = pd * (dp - (dp * pd).sum(axis=-1, keepdims=True)) * scale
    return ds @ k, ds.swapaxes(-1, -2) @ q, dv


def attention_backward_no_scale(dout, cache):
    """dq = ds k and dk = ds^T q, without the 1/sqrt(hs) the scores were scaled by."""
    q, k, v, p, pd, mask_scale, scale = cache
    dpd = dout @ v.swapaxes(-1, -2)
    dv = pd.swapaxes(-1, -2) @ dout
    dp = dropout_backward(dpd, mask_scale)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    return ds @ k, ds.swapaxes(-1, -2) @ q, dv


def linear_backward_bias_unsummed(dy, cache):
    """db = dy.sum(axis=0): summed over the first axis only, not over every row."""
    x, W, has_bias = cache
    dx = dy @ W.T
    dW = x.reshape(-1, x.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])
    return dx, dW, (dy.sum(axis=0) if has_bias else None)


def dropout_backward_unscaled(dy, scale):
    """dx = dy * mask: the survivors' 1/(1-p) forgotten."""
    if scale is None:
        return dy
    return dy * (scale != 0)


def layernorm_backward_no_var(dy, cache):
    """dx = rstd * (dxhat - mean(dxhat)): the path through the variance left out."""
    xhat, rstd, g = cache
    C = xhat.shape[-1]
    dxhat = dy * g
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True))
    dy2 = dy.reshape(-1, C)
    return dx, (dy2 * xhat.reshape(-1, C)).sum(axis=0), dy2.sum(axis=0)


def gelu_backward_no_product_rule(dy, cache):
    """d/dx of 0.5 x (1 + tanh u) taken as 0.5 x tanh'(u) u': the 0.5 (1 + t) term is missing."""
    x, t = cache
    return dy * (0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_A * x * x))


def residual_backward_no_skip(dy):
    """Only f's branch receives dy; the skip path gets nothing added."""
    return np.zeros_like(dy), dy


def adamw_step_coupled(self, grads, lr=None):
    """L2 regularisation in Adam: wd * p added to the gradient instead of decaying the weights."""
    lr = self.lr if lr is None else lr
    self.t += 1
    c1, c2 = 1.0 - self.b1 ** self.t, 1.0 - self.b2 ** self.t
    for name, p in self.params.items():
        g = grads[name]
        if self.weight_decay and p.ndim >= 2:
            g = g + self.weight_decay * p
        m, v = self.m[name], self.v[name]
        m *= self.b1
        m += (1.0 - self.b1) * g
        v *= self.b2
        v += (1.0 - self.b2) * (g * g)
        p -= lr * (m / c1) / (np.sqrt(v / c2) + self.eps)


@dataclass
class Bug:
    """One planted mistake: the function it replaces, the wrong twin, and where the report sees it."""
    target: str          # the function of numgpt.layers replaced, or "AdamW.step"
    wrong: object
    title: str
    caught_by: tuple     # the report's checks ("layer NAME" / "optimizer adamw") that must fail


CATALOGUE = {
    "embedding_fancy_index": Bug(
        "embedding_backward", embedding_backward_fancy_index,
        "dW[idx] += dout instead of an accumulating add (np.add.at)", ("layer embedding",)),
    "softmax_no_rowsum": Bug(
        "attention_backward", attention_backward_no_rowsum,
        "the softmax backward without its row-sum term", ("layer attention", "layer multihead")),
    "softmax_dropped_probs": Bug(
        "attention_backward", attention_backward_dropped_probs,
        "the dropped-out probabilities used in the softmax backward",
        ("layer attention", "layer multihead")),
    "bias_unsummed": Bug(
        "linear_backward", linear_backward_bias_unsummed,
        "a bias gradient not summed over rows", ("layer linear", "layer multihead",
                                                 "layer feedforward")),
    "dropout_unscaled": Bug(
        "dropout_backward", dropout_backward_unscaled,
        "dropout without 1/(1-p)", ("layer dropout", "layer multihead", "layer feedforward")),
    "layernorm_no_var": Bug(
        "layernorm_backward", layernorm_backward_no_var,
        "LayerNorm without the variance term", ("layer layernorm",)),
    "attention_no_scale": Bug(
        "attention_backward", attention_backward_no_scale,
        "attention without the scale 1/sqrt(hs)", ("layer attention", "layer multihead")),
    "gelu_no_product_rule": Bug(
        "gelu_backward", gelu_backward_no_product_rule,
        "GELU's derivative without the product rule", ("layer gelu", "layer feedforward")),
    "residual_no_skip": Bug(
        "residual_backward", residual_backward_no_skip,
        "the residual's gradient not added to the skip path", ("layer residual",)),
    "adamw_coupled_decay": Bug(
        "AdamW.step", adamw_step_coupled,
        "AdamW's decay applied to the gradient instead of the weights", ("optimizer adamw",)),
}


@contextlib.contextmanager
def plant(name):
    """Within the block, catalogue entry `name` replaces the function it is a wrong twin of."""
    bug = CATALOGUE[name]
    with swap({bug.target: bug.wrong}):
        yield bug
