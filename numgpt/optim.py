"""AdamW, gradient clipping by global norm, and the learning-rate schedule.

Derivation of the update: docs/derivations.md#adamw
Tests: tests/test_optim.py
"""
import math

import numpy as np


def decays(name, p):
    """Weight decay applies to matrices and embedding tables (ndim >= 2), never to biases or LayerNorm."""
    return p.ndim >= 2


class ListedGrads(dict):
    """A gradients dict (name -> array) that also holds its arrays, flattened and in the order of
    the parameters, in a numba typed list (`flat`). The fused training step returns one, and
    clip_grad_norm and the kernels' AdamW then take all of them in one compiled call each
    instead of one call per tensor (which cost a small model more than the work)."""

    def __init__(self, items, flat):
        super().__init__(items)
        self.flat = flat

    # an entry replaced or removed: the list no longer shows the dict, so forget it (the
    # per-tensor paths then run)
    def __setitem__(self, key, value):
        self.flat = None
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.flat = None
        super().__delitem__(key)

    def _forget(name):
        def method(self, *a, **k):
            self.flat = None
            return getattr(dict, name)(self, *a, **k)
        method.__name__ = name
        return method

    update, pop, popitem = _forget("update"), _forget("pop"), _forget("popitem")
    setdefault, clear, __ior__ = _forget("setdefault"), _forget("clear"), _forget("__ior__")
    del _forget


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), updating a params dict in place.

    For each parameter p with gradient g, at step t = 1, 2, ...:
        p <- p - lr * wd * p                      (only where decays(name, p))
        m <- b1 m + (1 - b1) g,    v <- b2 v + (1 - b2) g^2
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 use_kernels=False):
        self.params = params
        self.use_kernels = use_kernels
        self.lr = lr
        self.b1, self.b2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.t = 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads, lr=None):
        """One update of every parameter from grads (name -> array); lr overrides self.lr for this step."""
        lr = self.lr if lr is None else lr
        self.t += 1
        b1, b2, t = self.b1, self.b2, self.t
        c1 = 1.0 - b1 ** t
        c2 = 1.0 - b2 ** t
        step_size = lr / c1
        if self.use_kernels and self._step_listed(grads, lr, c1, c2):
            return
        if self.use_kernels:
            from numgpt.kernels._jit import pick
            from numgpt.kernels.adamw import adamw_update
        for name, p in self.params.items():
            g = grads[name]
            m, v = self.m[name], self.v[name]
            if self.use_kernels:  # the same update in one pass over memory (kernels/adamw.py)
                decay = 1.0 - lr * self.weight_decay if decays(name, p) else 1.0
                pick(adamw_update, p.size)(p.reshape(-1), np.ascontiguousarray(g).reshape(-1),
                                           m.reshape(-1), v.reshape(-1), lr, b1, b2, self.eps,
                                           decay, c1, c2)
                continue
            if self.weight_decay and decays(name, p):
                p *= 1.0 - lr * self.weight_decay
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            denom = np.sqrt(v / c2)
            denom += self.eps
            p -= step_size * (m / denom)

    def _step_listed(self, grads, lr, c1, c2):
        """The kernels' update of every tensor in one call, when grads is a ListedGrads in the
        order of the parameters; False (nothing done) otherwise."""
        flat = getattr(grads, "flat", None)
        if flat is None or list(grads) != list(self.params):
            return False
        from numba.typed import List

        from numgpt.kernels.adamw import adamw_update_lists
        key = [id(a) for d in (self.params, self.m, self.v) for a in d.values()]
        if getattr(self, "_lists_key", None) != key:  # the typed lists, remade when arrays change
            self._lists = [List([a.reshape(-1) for a in d.values()])
                           for d in (self.params, self.m, self.v)]
            self._decays = np.array([decays(k, p) for k, p in self.params.items()])
            self._lists_key = key
        P, M, V = self._lists
        adamw_update_lists(P, flat, M, V, self._decays, lr, self.b1, self.b2, self.eps,
                           self.weight_decay, c1, c2)
        return True

    def state_dict(self):
        """name -> array of the optimizer's state ('m.<param>', 'v.<param>'), plus the step count."""
        out = {"t": np.array(self.t, dtype=np.int64)}
        for k in self.params:
            out["m." + k] = self.m[k]
            out["v." + k] = self.v[k]
        return out

    def load_state_dict(self, state):
        t = np.asarray(state["t"])
        if t.shape != () or t.dtype.kind not in "iu" or not 0 <= int(t) < 2 ** 40:
            raise ValueError(f"optimizer step count t must be a whole number >= 0, got {t!r}")
        for k, p in self.params.items():
            for slot in ("m.", "v."):
                a = np.asarray(state[slot + k])
                if a.shape != p.shape or a.dtype.kind != "f" or not np.isfinite(a).all():
                    raise ValueError(f"optimizer state {slot + k} must be finite floats of shape "
                                     f"{p.shape}, got {a.dtype} {a.shape}")
                if slot == "v." and (a < 0).any():
                    raise ValueError(f"optimizer state {slot + k} holds negative values")
        self.t = int(t)
        for k, p in self.params.items():
            self.m[k] = np.asarray(state["m." + k]).astype(p.dtype, copy=True)
            self.v[k] = np.asarray(state["v." + k]).astype(p.dtype, copy=True)


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place so their global L2 norm is at most max_norm; returns the norm before."""
    flat = getattr(grads, "flat", None)  # a ListedGrads: one compiled call each
    if flat is not None:
        from numgpt.kernels.adamw import scale_lists, sum_squares_lists
        total = math.sqrt(sum_squares_lists(flat))
        if max_norm > 0 and total > max_norm:
            scale_lists(flat, flat[0].dtype.type(max_norm / (total + 1e-6)))
        return total
    total = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    if max_norm > 0 and total > max_norm:
        s = max_norm / (total + 1e-6)
        for g in grads.values():
            g *= s
    return total


def get_lr(it, cfg):
    """Learning rate at iteration it (0-based): linear warmup over warmup_iters, then constant or
    cosine decay from learning_rate to min_lr at max_iters (when cfg.decay_lr)."""
    lr = cfg.learning_rate
    if cfg.warmup_iters > 0 and it < cfg.warmup_iters:
        return lr * (it + 1) / cfg.warmup_iters
    if not cfg.decay_lr:
        return lr
    span = max(1, cfg.max_iters - cfg.warmup_iters)
    frac = min(1.0, (it - cfg.warmup_iters) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (lr - cfg.min_lr)
