"""Gradient checks of every layer (float64 central differences), and a check that the checker fails
on a wrong backward. Derivations: docs/derivations.md."""
import numpy as np
import pytest

from numgpt.gradcheck import check_layer, rel_error
from numgpt.layers import (attention_backward, attention_forward, cross_entropy_backward,
                           cross_entropy_forward, dropout_backward, dropout_forward,
                           embedding_backward, embedding_forward, feedforward_backward,
                           feedforward_forward, gelu_backward, gelu_forward, layernorm_backward,
                           layernorm_forward, linear_backward, linear_forward, multihead_backward,
                           multihead_forward, position_backward, position_forward, relu_backward,
                           relu_forward, residual_backward, residual_forward)
from numgpt.layers.attention import causal_mask

pytestmark = pytest.mark.gradcheck  # pytest -m gradcheck runs these

TOL = 1e-6
B, T, C = 2, 5, 6


def rnd(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def assert_small(errors, tol=TOL):
    assert errors, "nothing was checked"
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"


def test_embedding_grad():
    idx = np.random.default_rng(1).integers(0, 7, (B, T))
    idx[0, :3] = 2  # repeated ids: their gradients must add up
    assert_small(check_layer(lambda W: embedding_forward(idx, W),
                             lambda d, c: {"W": embedding_backward(d, c)},
                             {"W": rnd(7, C)}))


def test_position_grad():
    def fwd(P):
        pos, c = position_forward(T, P)
        return np.broadcast_to(pos, (B, T, C)) * 1.0, c
    errors = check_layer(fwd, lambda d, c: {"P": position_backward(d, c)}, {"P": rnd(T + 3, C)})
    assert_small(errors)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_grad(bias):
    arrays = {"x": rnd(B, T, C), "W": rnd(C, 4, seed=1)}
    if bias:
        arrays["b"] = rnd(4, seed=2)

    def bwd(d, c):
        dx, dW, db = linear_backward(d, c)
        return {"x": dx, "W": dW, **({"b": db} if bias else {})}
    assert_small(check_layer(linear_forward, bwd, arrays))


def test_relu_grad():
    x = rnd(B, T, C)
    x[np.abs(x) < 1e-2] = 0.5  # keep inputs away from the kink at 0
    assert_small(check_layer(relu_forward, lambda d, m: {"x": relu_backward(d, m)}, {"x": x}))


def test_gelu_grad():
    x = rnd(B, T, C) * 3
    assert_small(check_layer(gelu_forward, lambda d, c: {"x": gelu_backward(d, c)}, {"x": x}))


def test_gelu_matches_reference_values():
    # GELU(tanh) at a few points, computed by hand from 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))
    x = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    y, _ = gelu_forward(x)
    c = np.sqrt(2 / np.pi)
    expect = 0.5 * x * (1 + np.tanh(c * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(y, expect, rtol=1e-15)
    assert abs(y[1] - (-0.15880800939172324)) < 1e-12


def test_layernorm_grad():
    arrays = {"x": rnd(B, T, C) * 2 + 1, "g": rnd(C, seed=1), "b": rnd(C, seed=2)}

    def bwd(d, c):
        dx, dg, db = layernorm_backward(d, c)
        return {"x": dx, "g": dg, "b": db}
    assert_small(check_layer(layernorm_forward, bwd, arrays))


def test_layernorm_matches_definition():
    x = rnd(3, C)
    y, _ = layernorm_forward(x, np.ones(C), np.zeros(C))
    expect = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, expect, rtol=1e-12)


def test_dropout_grad():
    p = 0.3
    mask = np.random.default_rng(5).random((B, T, C)) >= p
    assert_small(check_layer(lambda x: dropout_forward(x, p, mask=mask),
                             lambda d, c: {"x": dropout_backward(d, c)}, {"x": rnd(B, T, C)}))


def test_dropout_replays_its_mask_from_the_seed_and_is_inverted():
    x = np.ones((200, 200))
    y1, _ = dropout_forward(x, 0.25, np.random.default_rng(3))
    y2, _ = dropout_forward(x, 0.25, np.random.default_rng(3))
    np.testing.assert_array_equal(y1, y2)
    assert set(np.unique(y1)) == {0.0, 1.0 / 0.75}
    assert abs((y1 == 0).mean() - 0.25) < 0.01
    assert abs(y1.mean() - 1.0) < 0.02  # inverted: the expectation is unchanged
    y0, c0 = dropout_forward(x, 0.0)
    assert y0 is x and c0 is None


def test_cross_entropy_grad():
    targets = np.random.default_rng(2).integers(0, 9, (B, T))

    def fwd(z):
        loss, cache = cross_entropy_forward(z, targets)
        return np.array(loss), cache
    # loss is a scalar: dout is one number and the gradient is dout * dlogits
    assert_small(check_layer(fwd, lambda d, c: {"z": cross_entropy_backward(c, float(d))},
                             {"z": rnd(B, T, 9)}))


def test_cross_entropy_value_and_extremes():
    z = np.array([[1.0, 2.0, 3.0]])
    loss, _ = cross_entropy_forward(z, np.array([2]))
    assert abs(loss - (np.log(np.exp(z).sum()) - 3.0)) < 1e-15
    # huge logits do not overflow
    loss, cache = cross_entropy_forward(np.array([[1e4, 0.0, -1e4]]), np.array([1]))
    assert np.isfinite(loss) and abs(loss - 1e4) < 1e-9
    assert np.all(np.isfinite(cross_entropy_backward(cache)))
    loss32, _ = cross_entropy_forward(np.array([[80.0, 0.0]], dtype=np.float32), np.array([0]))
    assert np.isfinite(loss32)


@pytest.mark.parametrize("H", [1, 3])
def test_attention_core_grad(H):
    arrays = {n: rnd(B, H, T, 4, seed=s) for s, n in enumerate("qkv")}

    def bwd(d, c):
        dq, dk, dv = attention_backward(d, c)
        return {"q": dq, "k": dk, "v": dv}
    assert_small(check_layer(attention_forward, bwd, arrays))


def test_attention_core_grad_with_dropout():
    arrays = {n: rnd(B, 2, T, 4, seed=s) for s, n in enumerate("qkv")}

    def fwd(q, k, v):
        return attention_forward(q, k, v, 0.3, np.random.default_rng(11))

    def bwd(d, c):
        dq, dk, dv = attention_backward(d, c)
        return {"q": dq, "k": dk, "v": dv}
    assert_small(check_layer(fwd, bwd, arrays))


def test_attention_is_causal():
    q, k, v = (rnd(1, 2, T, 4, seed=s) for s in range(3))
    out, cache = attention_forward(q, k, v)
    p = cache[3]
    assert np.all(p[..., causal_mask(T)] == 0)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-14)
    # changing the future does not change the past
    v2 = v.copy()
    v2[..., -1, :] += 10
    out2, _ = attention_forward(q, k, v2)
    np.testing.assert_array_equal(out[..., :-1, :], out2[..., :-1, :])
    # scores are scaled by head_size ** -0.5: at position 1, softmax over (s0, s1)
    s = q[0, 0, 1] @ k[0, 0, :2].T / 2.0
    np.testing.assert_allclose(p[0, 0, 1, :2], np.exp(s) / np.exp(s).sum(), rtol=1e-13)


@pytest.mark.parametrize("n", [1, 3, T])
def test_attention_of_the_last_queries_is_the_last_rows(n):
    """With fewer queries than keys (the decoder's cache), the queries are the last positions:
    the result is the last n rows of the square attention, and the mask is causal_mask's
    corner."""
    q, k, v = (rnd(2, 2, T, 4, seed=s) for s in range(3))
    full, _ = attention_forward(q, k, v)
    last, cache = attention_forward(q[..., -n:, :], k, v)
    np.testing.assert_allclose(last, full[..., -n:, :], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(causal_mask(n, T), causal_mask(T)[-n:])
    assert np.all(cache[3][..., causal_mask(n, T)] == 0)


@pytest.mark.parametrize("proj,H,drop", [(False, 1, 0.0), (False, 3, 0.0), (True, 3, 0.0),
                                         (True, 2, 0.25)])
def test_multihead_grad(proj, H, drop):
    names = ["x", "w_q", "w_k", "w_v"] + (["w_proj", "b_proj"] if proj else [])
    arrays = {n: rnd(B, T, C, seed=i) if n == "x" else rnd(*((C,) if n.startswith("b") else (C, C)), seed=i)
              for i, n in enumerate(names)}

    def fwd(x, **p):
        return multihead_forward(x, p, H, drop, drop, np.random.default_rng(7))

    def bwd(d, c):
        dx, g = multihead_backward(d, c)
        return {"x": dx, **g}
    assert_small(check_layer(fwd, bwd, arrays))


@pytest.mark.parametrize("act,proj,drop", [("gelu", True, 0.0), ("relu", True, 0.0),
                                           ("relu", False, 0.0), ("gelu", True, 0.2)])
def test_feedforward_grad(act, proj, drop):
    hidden = 10 if proj else C
    arrays = {"x": rnd(B, T, C), "w_fc": rnd(C, hidden, seed=1), "b_fc": rnd(hidden, seed=2)}
    if proj:
        arrays.update(w_out=rnd(hidden, C, seed=3), b_out=rnd(C, seed=4))

    def fwd(x, **p):
        return feedforward_forward(x, p, act, drop, np.random.default_rng(3))

    def bwd(d, c):
        dx, g = feedforward_backward(d, c)
        return {"x": dx, **g}
    assert_small(check_layer(fwd, bwd, arrays))


def test_residual_grad():
    W = rnd(C, C, seed=3)

    def fwd(x):  # y = x + f(x) with f(x) = x W, so dy/dx = I + W^T applied to dout
        fx, c = linear_forward(x, W)
        return residual_forward(x, fx), c

    def bwd(d, c):
        dskip, dfx = residual_backward(d)
        return {"x": dskip + linear_backward(dfx, c)[0]}
    assert_small(check_layer(fwd, bwd, {"x": rnd(B, T, C)}))


def test_layers_keep_float32():
    x = rnd(B, T, C).astype(np.float32)
    g = np.ones(C, np.float32)
    assert layernorm_forward(x, g, g)[0].dtype == np.float32
    assert gelu_forward(x)[0].dtype == np.float32
    assert dropout_forward(x, 0.1, np.random.default_rng(0))[0].dtype == np.float32
    q = x.reshape(B, 1, T, C)
    out, cache = attention_forward(q, q, q)
    assert out.dtype == np.float32
    assert all(a.dtype == np.float32 for a in attention_backward(out, cache))
    assert cross_entropy_backward(cross_entropy_forward(x, np.zeros((B, T), int))[1]).dtype == np.float32


# ---- the checker itself must fail on a wrong backward ----

def _wrong_layernorm_backward(d, c):
    # a classic mistake: forgetting the mean(dxhat * xhat) term of the LayerNorm input gradient
    xhat, rstd, g = c
    dxhat = d * g
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True))
    return {"x": dx}


def _wrong_attention_backward(d, c):
    # forgetting the 1/sqrt(hs) scale in the gradient of the scores
    dq, dk, dv = attention_backward(d, c)
    scale = c[-1]
    return {"q": dq / scale, "k": dk / scale, "v": dv}


def test_checker_catches_wrong_layernorm_backward():
    g, b = rnd(C, seed=1), rnd(C, seed=2)
    errors = check_layer(lambda x: layernorm_forward(x, g, b), _wrong_layernorm_backward,
                         {"x": rnd(B, T, C)})
    assert errors["x"] > 1e-3


def test_checker_catches_wrong_attention_backward():
    arrays = {n: rnd(B, 2, T, 4, seed=s) for s, n in enumerate("qkv")}
    errors = check_layer(attention_forward, _wrong_attention_backward, arrays)
    assert errors["q"] > 1e-3 and errors["k"] > 1e-3 and errors["v"] < TOL


def test_checker_catches_a_tiny_error():
    # one entry of dW off by one part in ten thousand (1e-4) gives the 24-entry tensor a relative
    # error of about 5e-6: above TOL, so the layer tests would fail on it, and some 1e5 times the
    # ~1e-10 round-off of the correct dW
    arrays = {"x": rnd(B, T, C), "W": rnd(C, 4, seed=1)}

    def bwd(d, c):
        dx, dW, _ = linear_backward(d, c)
        dW = dW.copy()
        dW[0, 0] *= 1 + 1e-4
        return {"x": dx, "W": dW}
    errors = check_layer(linear_forward, bwd, arrays)
    assert errors["x"] <= TOL and errors["W"] > TOL


def test_rel_error():
    assert rel_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert abs(rel_error([1.0], [-1.0]) - 1.0) < 1e-15
    assert rel_error([0.0], [0.0]) == 0.0
