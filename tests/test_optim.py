"""AdamW against its formula written out by hand, weight decay only on matrices and embeddings,
gradient clipping, and the learning-rate schedule. Derivation: docs/derivations.md#adamw"""
import math

import numpy as np
import pytest

import numgpt
from numgpt.optim import AdamW, clip_grad_norm, get_lr


def test_adamw_matches_formula():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    ref = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v_ = {k: np.zeros_like(v) for k, v in ref.items()}
    lr, b1, b2, eps, wd = 0.01, 0.8, 0.95, 1e-6, 0.1
    opt = AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for t in range(1, 6):
        grads = {k: rng.standard_normal(p.shape) for k, p in params.items()}
        opt.step(grads)
        for k in ref:
            g = grads[k]
            if k == "w":  # decoupled decay, on the matrix only
                ref[k] = ref[k] - lr * wd * ref[k]
            m[k] = b1 * m[k] + (1 - b1) * g
            v_[k] = b2 * v_[k] + (1 - b2) * g * g
            mhat = m[k] / (1 - b1 ** t)
            vhat = v_[k] / (1 - b2 ** t)
            ref[k] = ref[k] - lr * mhat / (np.sqrt(vhat) + eps)
        for k in ref:
            np.testing.assert_allclose(params[k], ref[k], rtol=1e-13, atol=1e-15)


def test_no_decay_on_biases_and_layernorm():
    model = numgpt.build_model("preln", dtype=np.float64)
    before = model.get_params()
    opt = AdamW(model.params, lr=0.1, weight_decay=0.5)
    opt.step({k: np.zeros_like(v) for k, v in model.params.items()})  # zero gradient: decay only
    for k, v in model.params.items():
        if before[k].ndim >= 2:
            np.testing.assert_allclose(v, before[k] * (1 - 0.05))
        else:  # biases, LayerNorm gains and shifts are untouched
            np.testing.assert_array_equal(v, before[k])


def test_adamw_state_roundtrip():
    rng = np.random.default_rng(1)
    p1 = {"w": rng.standard_normal((2, 2))}
    p2 = {"w": p1["w"].copy()}
    o1, o2 = AdamW(p1), AdamW(p2)
    g = {"w": rng.standard_normal((2, 2))}
    o1.step(g)
    o2.load_state_dict(o1.state_dict())
    p2["w"][:] = p1["w"]
    o1.step(g)
    o2.step(g)
    np.testing.assert_array_equal(p1["w"], p2["w"])
    with pytest.raises(ValueError, match="shape"):
        AdamW({"w": np.zeros(3)}).load_state_dict(o1.state_dict())


def test_clip_grad_norm():
    g = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    norm = clip_grad_norm(g, 1.0)
    assert norm == 5.0
    total = math.sqrt(sum(float((x * x).sum()) for x in g.values()))
    assert abs(total - 1.0) < 1e-6
    np.testing.assert_allclose(g["a"], [0.6, 0.0], rtol=1e-5)
    g2 = {"a": np.array([0.3, 0.4])}
    assert clip_grad_norm(g2, 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(g2["a"], [0.3, 0.4])  # under the limit: unchanged
    g3 = {"a": np.array([30.0, 40.0])}
    clip_grad_norm(g3, 0.0)  # 0 = off
    np.testing.assert_array_equal(g3["a"], [30.0, 40.0])


def test_lr_schedule():
    cfg = numgpt.get_config("laptop", learning_rate=1e-3, min_lr=1e-4, warmup_iters=10,
                            max_iters=110, decay_lr=True)
    assert get_lr(0, cfg) == pytest.approx(1e-4)          # warmup starts at lr / warmup
    assert get_lr(9, cfg) == pytest.approx(1e-3)          # and reaches lr
    assert get_lr(10, cfg) == pytest.approx(1e-3)         # cosine starts at lr
    assert get_lr(60, cfg) == pytest.approx(5.5e-4)       # half way: the mean of lr and min_lr
    assert get_lr(110, cfg) == pytest.approx(1e-4)        # ends at min_lr
    assert get_lr(500, cfg) == pytest.approx(1e-4)
    lrs = [get_lr(i, cfg) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))      # monotone decay
    const = numgpt.get_config("preln")
    assert {get_lr(i, const) for i in (0, 100, 4999)} == {1e-3}
