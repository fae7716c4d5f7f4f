"""Property-based: any small config within the limits builds, trains a step, samples, and passes a
float64 gradient check, with the kernels on and off."""
import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import numgpt
from numgpt.generate import generate
from numgpt.gradcheck import check_model_grads


@st.composite
def configs(draw):
    model = draw(st.sampled_from(["gpt", "gpt", "gpt", "bigram"]))
    n_head = draw(st.integers(1, 3))
    over = dict(
        model=model, vocab_size=draw(st.integers(2, 9)), block_size=draw(st.integers(1, 6)),
        # at least 4 channels: LayerNorm over 2 maps every input to +-1 and its gradient to ~0
        n_head=n_head, n_embd=n_head * draw(st.integers(-(-4 // n_head), 4)), n_layer=draw(st.integers(1, 2)),
        attn_proj=draw(st.booleans()), residual=draw(st.booleans()),
        norm=draw(st.sampled_from(["none", "pre", "post"])),
        activation=draw(st.sampled_from(["relu", "gelu"])),
        dropout=draw(st.sampled_from([0.0, 0.0, 0.3])), kernels=draw(st.booleans()),
        zero_head=False, init="normal", init_std=0.5,
    )
    ffn = draw(st.sampled_from(["none", "short", "full"]))
    over["ffn_mult"] = 0.0 if ffn == "none" else (1.0 if ffn == "short" else draw(st.sampled_from([2.0, 4.0])))
    over["ffn_proj"] = ffn != "short"
    return over, draw(st.integers(1, 3)), draw(st.integers(0, 2 ** 16))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
@example(({"model": "gpt", "vocab_size": 9, "block_size": 4, "n_head": 2, "n_embd": 8,
           "n_layer": 1, "attn_proj": False, "residual": True, "norm": "pre",
           "activation": "relu", "dropout": 0.0, "kernels": False, "zero_head": False,
           "init": "normal", "init_std": 0.5, "ffn_mult": 4.0, "ffn_proj": True}, 2, 17776))
def test_random_small_configs_train_sample_and_check(spec):
    over, B, seed = spec
    cfg = numgpt.get_config("preln", **over)
    rng = np.random.default_rng(seed)
    T = cfg.block_size
    x = rng.integers(0, cfg.vocab_size, (B, T))
    y = rng.integers(0, cfg.vocab_size, (B, T))
    # a float64 gradient check of every tensor
    m64 = numgpt.GPT(cfg, seed=seed, dtype=np.float64)
    # biases start at exactly 0: a row that dropout zeroed would then sit on ReLU's kink, where
    # central differences give half a slope; random biases keep every input off it
    prng = np.random.default_rng(seed + 1)
    m64.set_params({k: v + 0.1 * prng.standard_normal(v.shape) for k, v in m64.params.items()})
    # sampled entries whose gradient is ~0 (a dead ReLU, a dropped unit, a token barely seen) are
    # held to an absolute error of 1e-8 instead (tiny=1e-4): central differences cannot resolve
    # them relatively. Random configs (one channel, ReLU kinks) are noisier than the fixed checks
    # in test_model.py (1e-6), but a wrong backward is off by far more than 1e-4.
    # A ReLU input within h of 0 (init_std 0.5 puts many near it) is crossed by x +- h, and the
    # difference quotient then mixes two slopes; a step ten times smaller does not cross it
    # (spec: preln, relu, 8 channels, seed 17776: 1e-2 at h=1e-6, nothing above 1e-6 at 1e-7),
    # while a wrong backward is off at every step size
    errors = check_model_grads(m64, x, y, train=True, seed=seed, per_tensor=6, h=1e-6, tiny=1e-4)
    if max(errors.values()) >= 1e-4:
        errors = check_model_grads(m64, x, y, train=True, seed=seed, per_tensor=6, h=1e-7,
                                   tiny=1e-4)
    for name, err in errors.items():
        assert err < 1e-4, (name, err, over)
    # one float32 training step changes the parameters and keeps the loss finite
    m = numgpt.GPT(cfg, seed=seed)
    before = m.get_params()
    opt = numgpt.make_optimizer(m)
    loss, g = m.loss_and_grads(x, y, rng=rng)
    assert np.isfinite(loss)
    opt.step(g)
    assert any(not np.array_equal(before[k], m.params[k]) for k in before)
    # sampling gives valid ids, past the block
    out = generate(m, x[:1, :1], 2 * T + 1, rng=rng, top_k=2)
    assert out.shape == (1, 2 * T + 2) and out.min() >= 0 and out.max() < cfg.vocab_size
