"""The assembled GPT: parameter counts of every ladder rung, loss at init, whole-model gradient
checks (every parameter tensor, dropout on with a fixed mask), and overfitting one batch."""
import math

import numpy as np
import pytest

import numgpt
from numgpt.gradcheck import check_model_grads

COUNTS = {"bigram": 4225, "single_head": 7553, "multi_head": 7553, "ffn": 8609,
          "residual": 41921, "layernorm": 42369, "preln": 42369, "scaled": 10788929}


@pytest.mark.parametrize("preset", list(COUNTS))
def test_param_counts_match_the_video(preset):
    m = numgpt.build_model(preset)
    assert m.num_params() == COUNTS[preset]
    assert set(m.params) == set(numgpt.param_shapes(m.cfg))


def test_the_block_is_described_once_from_the_config():
    """numgpt/arch.py: the model, the fused step and the decoder read the same Arch."""
    from numgpt.arch import ACT_GELU, ACT_RELU, NORM_NONE, NORM_POST, NORM_PRE, arch
    assert len({NORM_NONE, NORM_POST, NORM_PRE}) == 3 and ACT_RELU != ACT_GELU
    a = arch(numgpt.get_config("laptop"))
    assert (a.n_layer, a.n_head, a.norm, a.activation) == (4, 4, NORM_PRE, ACT_RELU)
    assert a.residual and a.attn_proj and a.ffn and a.ffn_proj
    assert all(type(v) in (int, bool) for v in a)  # plain values: numba takes them as they are
    a = arch(numgpt.get_config("layernorm", activation="gelu"))
    assert a.norm == NORM_POST and a.activation == ACT_GELU
    a = arch(numgpt.get_config("single_head"))
    assert a.norm == NORM_NONE and not (a.residual or a.attn_proj or a.ffn)
    assert arch(numgpt.get_config("ffn")).ffn and not arch(numgpt.get_config("ffn")).ffn_proj
    m = numgpt.build_model("preln")
    assert m.arch == arch(m.cfg)


def _symbolic_pieces():
    """BlockForward and BlockBackward pieces that compute on strings: each returns the expression
    of its output in its inputs, so what a block returns shows which piece was fed by which."""
    from numgpt.arch import BlockBackward, BlockForward
    fwd = BlockForward(norm_in=lambda st, j, x: f"in{j}({x})",
                       sublayer=lambda st, j, h: f"f{j}({h})",
                       add=lambda st, x, f: f"({x} + {f})",
                       norm_out=lambda st, j, x: f"out{j}({x})")
    bwd = BlockBackward(norm_out=lambda st, j, dy: f"out{j}'({dy})",
                        sublayer=lambda st, j, df: f"f{j}'({df})",
                        norm_in=lambda st, j, dh: f"in{j}'({dh})",
                        add=lambda st, dy, dh: f"({dy} + {dh})")
    return fwd, bwd


@pytest.mark.parametrize("preset, forward, backward", [
    ("single_head", "f0(x)", "f0'(d)"),
    ("ffn", "f1(f0(x))", "f0'(f1'(d))"),
    ("residual", "((x + f0(x)) + f1((x + f0(x))))", "((d + f1'(d)) + f0'((d + f1'(d))))"),
    ("layernorm", "out1((out0((x + f0(x))) + f1(out0((x + f0(x))))))",
     "(out0'((out1'(d) + f1'(out1'(d)))) + f0'(out0'((out1'(d) + f1'(out1'(d))))))"),
    ("preln", "((x + f0(in0(x))) + f1(in1((x + f0(in0(x))))))",
     "((d + in1'(f1'(d))) + in0'(f0'((d + in1'(f1'(d))))))"),
])
def test_the_block_is_written_once(preset, forward, backward):
    """numgpt/arch.py's block_forward and block_backward wire a block's pieces as its Arch says:
    pre-norm LN(x) feeds the sublayer, post-norm LN follows the residual sum, and the backward
    runs in reverse, each piece fed by the right one (here on symbols: f0 is attention, f1 the
    feed-forward, in/out the LayerNorms before and after, ' a backward pass)."""
    from numgpt.arch import arch, block_backward, block_forward
    a = arch(numgpt.get_config(preset))
    fwd, bwd = _symbolic_pieces()
    assert block_forward(a, fwd, None, "x") == forward
    assert block_backward(a, bwd, None, "d") == backward


def test_no_block_structure_outside_arch():
    """The model, the compiled step and the decoder run numgpt/arch.py's block_forward and
    block_backward themselves (compiled, for the kernels), and none of them reads the block's
    structure (where the LayerNorms sit, the residual sum, the sublayers) on its own."""
    import pathlib

    import numgpt.kernels.decode
    import numgpt.kernels.step
    import numgpt.model
    from numgpt import arch
    assert numgpt.model.block_forward is arch.block_forward
    assert numgpt.model.block_backward is arch.block_backward
    for mod in (numgpt.kernels.step, numgpt.kernels.decode):
        assert mod.block_forward.py_func.__code__ is arch.block_forward.__code__
    assert numgpt.kernels.step.block_backward.py_func.__code__ is arch.block_backward.__code__
    for mod in (numgpt.model, numgpt.kernels.step, numgpt.kernels.decode):
        text = pathlib.Path(mod.__file__).read_text(encoding="utf-8")
        for structure in ("NORM_PRE", "NORM_POST", ".residual", "n_sublayers"):
            assert structure not in text, f"{mod.__name__} reads the block's structure: {structure}"
    # and the three name a block's pieces alike: a reader finds the model's in the step's file
    forward = ("_norm_in", "_sublayer", "_add", "_norm_out")
    for name in forward + tuple(n + "_backward" for n in forward) + ("_Layer",):
        for mod in (numgpt.model, numgpt.kernels.step):
            assert hasattr(mod, name), f"{mod.__name__} has no {name}"


def test_the_block_description_prints_its_constants_names():
    """Arch holds ints for numba, but shows NORM_PRE and ACT_GELU, not 2 and 1."""
    from numgpt.arch import arch
    a = arch(numgpt.get_config("scaled", vocab_size=65))
    assert "norm=NORM_PRE" in repr(a) and "activation=ACT_RELU" in repr(a)
    a = arch(numgpt.get_config("layernorm", vocab_size=65, activation="gelu"))
    assert "norm=NORM_POST" in repr(a) and "activation=ACT_GELU" in repr(a)


@pytest.mark.parametrize("preset", numgpt.LADDER + ["laptop", "hour"])
def test_untrained_loss_is_near_uniform(preset):
    """With the video's init (every rung) an untrained model is near the uniform prediction,
    ln 65 = 4.17 (measured 0.01-0.53 above it: the bigram's N(0, 1) table, residual's sum of
    U(+-1/sqrt(fan_in)) branches); with the output layer at zero (zero_head), exactly there."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 65, (8, 16))
    y = rng.integers(0, 65, (8, 16))
    m = numgpt.build_model(preset, dtype=np.float64)
    T = min(m.cfg.block_size, 16)
    assert abs(m.loss(x[:, :T], y[:, :T]) - math.log(65)) < 0.6
    m = numgpt.build_model(preset, dtype=np.float64, zero_head=True)
    assert abs(m.loss(x[:, :T], y[:, :T]) - math.log(65)) < 1e-12


def test_every_rung_starts_as_the_videos_model():
    """Its output layer drawn like every other layer (zero_head off): docs/ladder.md."""
    for rung in numgpt.LADDER:
        cfg = numgpt.get_config(rung)
        assert not cfg.zero_head and cfg.init == ("normal" if rung == "scaled" else "torch")
    m = numgpt.build_model("bigram", dtype=np.float64)
    assert abs(m.params["tok_emb"].std() - 1) < 0.05  # nn.Embedding's N(0, 1) table


def small(preset, **kw):
    """A preset shrunk so that a full float64 gradient check takes a fraction of a second."""
    over = dict(vocab_size=11, block_size=6)
    if preset != "bigram":
        over.update(n_embd=12, n_head=1 if preset == "single_head" else 3,
                    n_layer=2 if numgpt.PRESETS[preset].get("n_layer", 1) > 1 else 1)
    if numgpt.PRESETS[preset].get("init") == "normal":
        over["init_std"] = 0.3  # GPT-2's 0.02 makes w_q, w_k gradients ~1e-5: too close to round-off
    over.update(kw)
    return numgpt.build_model(preset, dtype=np.float64, seed=3, **over)


def batch(m, B=3, seed=0):
    rng = np.random.default_rng(seed)
    T = m.cfg.block_size
    return rng.integers(0, m.cfg.vocab_size, (B, T)), rng.integers(0, m.cfg.vocab_size, (B, T))


CASES = [(p, {}) for p in numgpt.LADDER + ["laptop", "hour"]] + [
    ("preln", {"dropout": 0.2}), ("layernorm", {"dropout": 0.2}),
    ("residual", {"activation": "gelu", "dropout": 0.1}), ("laptop", {"dropout": 0.2}),
]
# the same checks with the numba kernels off (NumPy reference layers) and on
CASES = [(p, dict(kw, kernels=k)) for k in (False, True) for p, kw in CASES]


@pytest.mark.parametrize("preset,kw", CASES, ids=[f"{p}-{'-'.join(f'{k}{v}' for k, v in kw.items())}"
                                                   for p, kw in CASES])
def test_model_gradients(preset, kw):
    """Every parameter tensor, 25 entries sampled from each, against central differences."""
    m = small(preset, **kw)
    # move every tensor off its init (a zero lm_head would block all gradients, LayerNorm would
    # sit at g = 1, b = 0), so that no gradient is trivially zero
    rng = np.random.default_rng(11)
    m.set_params({k: v + 0.5 * (v.std() or 0.1) * rng.standard_normal(v.shape)
                  for k, v in m.params.items()})
    x, y = batch(m)
    loss, grads = m.loss_and_grads(x, y, rng=np.random.default_rng(5))
    assert 0.5 < loss < 10  # a model in a sane regime, not saturated
    for k, g in grads.items():  # and every gradient is far from zero: the check is not trivial
        assert np.linalg.norm(g) > 1e-4 * np.sqrt(g.size), k
    errors = check_model_grads(m, x, y, train=True, seed=5, per_tensor=25)
    assert set(errors) == set(m.params)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-6, f"{worst}: {errors[worst]:.2e}"


@pytest.mark.parametrize("kernels", [False, True])
def test_model_check_fails_on_a_wrong_backward(monkeypatch, kernels):
    """Break one layer's backward inside the model: the whole-model check must see it."""
    from numgpt.ops import get_ops
    ops = get_ops(kernels)
    right = ops.layernorm_backward

    def wrong(dy, cache):
        dx, dg, db = right(dy, cache)
        return dx, dg * 1.01, db
    monkeypatch.setattr(ops, "layernorm_backward", wrong)
    m = small("preln", zero_head=False, kernels=kernels)
    errors = check_model_grads(m, *batch(m), per_tensor=25)
    assert errors["ln_f.g"] > 1e-3
    assert errors["lm_head.w"] < 1e-6


def test_dropout_makes_train_and_eval_differ_and_replays_with_a_seed():
    m = small("scaled", dropout=0.3, zero_head=False)
    x, y = batch(m)
    a = m.loss(x, y, train=True, rng=np.random.default_rng(1))
    b = m.loss(x, y, train=True, rng=np.random.default_rng(1))
    c = m.loss(x, y, train=True, rng=np.random.default_rng(2))
    e = m.loss(x, y, train=False)
    assert a == b and a != c and a != e
    with pytest.raises(ValueError):
        m.loss(x, y, train=True)  # dropout needs an explicit generator


@pytest.mark.parametrize("kernels", [False, True])
def test_a_forward_pass_without_the_cache_gives_the_same_logits(kernels):
    """model.loss (evaluation) keeps no activations for a backward pass: the same numbers."""
    m = small("scaled", dropout=0.3, zero_head=False, kernels=kernels)
    m32 = numgpt.GPT(m.cfg, dtype=np.float32, params=m.params)
    for model in (m, m32):
        x, y = batch(model)
        for train in (False, True):
            a, cache = model.forward(x, train, np.random.default_rng(5))
            b, none = model.forward(x, train, np.random.default_rng(5), keep_cache=False)
            assert cache is not None and none is None
            np.testing.assert_array_equal(a, b)
        loss, _ = model.loss_and_grads(x, y, train=False)
        assert model.loss(x, y) == loss


def test_float32_matches_float64():
    m64 = numgpt.build_model("preln", dtype=np.float64, seed=1)
    m32 = numgpt.build_model("preln", dtype=np.float32, seed=1)
    x, y = batch(m64, B=4)
    l64, g64 = m64.loss_and_grads(x, y)
    l32, g32 = m32.loss_and_grads(x, y)
    assert abs(l64 - l32) < 1e-5
    for k in g64:
        assert g32[k].dtype == np.float32
        np.testing.assert_allclose(g32[k], g64[k], rtol=1e-3, atol=1e-5)


def test_params_roundtrip_and_validation():
    m = numgpt.build_model("residual", seed=0)
    p = m.get_params()
    p["lm_head.b"] += 1.0
    m2 = numgpt.build_model("residual", seed=9)
    m2.set_params(p)
    np.testing.assert_array_equal(m2.params["lm_head.b"], p["lm_head.b"])
    p["lm_head.b"] += 1.0  # get_params returned copies: the model is unaffected
    assert not np.array_equal(m2.params["lm_head.b"], p["lm_head.b"])
    with pytest.raises(ValueError, match="shape"):
        m2.set_params({**p, "lm_head.b": np.zeros(3)})
    with pytest.raises(ValueError, match="missing"):
        m2.set_params({k: v for k, v in p.items() if k != "pos_emb"})
    with pytest.raises(ValueError, match="block_size"):
        m.forward(np.zeros((1, 9), dtype=int))


def test_a_small_model_overfits_one_batch():
    cfg = numgpt.get_config("preln", n_embd=32, n_layer=2, block_size=16)
    m = numgpt.GPT(cfg, seed=0, dtype=np.float32)
    opt = numgpt.AdamW(m.params, lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 65, (4, 16))
    y = rng.integers(0, 65, (4, 16))
    first = m.loss(x, y)
    for _ in range(300):
        loss, grads = m.loss_and_grads(x, y)
        opt.step(grads)
    assert first > 4.0
    assert m.loss(x, y) < 0.05


def test_bigram_learns_bigram_statistics():
    """The bigram model's optimum is the empirical next-character distribution."""
    m = numgpt.build_model("bigram", dtype=np.float64, vocab_size=3)
    x = np.array([[0, 0, 1, 2, 0, 1]])
    y = np.array([[0, 1, 2, 0, 1, 2]])
    opt = numgpt.AdamW(m.params, lr=0.05, weight_decay=0.0)
    for _ in range(2000):
        opt.step(m.loss_and_grads(x, y)[1])
    p = np.exp(m.params["tok_emb"])
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(p[0], [1 / 3, 2 / 3, 0], atol=0.02)
    np.testing.assert_allclose(p[1], [0, 0, 1], atol=0.02)
