"""Sampling: the key/value cache gives the same logits as a full forward pass, top-k / top-p /
temperature filter as documented, and extreme logits stay finite."""
import numpy as np
import pytest

import numgpt
from numgpt.generate import KVCache, generate, next_token_probs, sample_from


@pytest.mark.parametrize("preset", ["single_head", "ffn", "residual", "layernorm", "preln", "scaled"])
@pytest.mark.parametrize("kernels", [False, True])
def test_kv_cache_matches_full_forward(preset, kernels):
    m = numgpt.build_model(preset, dtype=np.float64, seed=1, block_size=12, n_embd=24,
                           n_head=1 if preset == "single_head" else 3, zero_head=False,
                           kernels=kernels, n_layer=2 if preset not in ("single_head", "ffn") else 1)
    idx = np.random.default_rng(0).integers(0, 65, (2, 12))
    full = m.forward(idx)[0]
    kv = KVCache(m, 2)
    first = m.forward(idx[:, :5], kv=kv)[0]          # prefill 5 positions at once
    np.testing.assert_allclose(first, full[:, :5], rtol=1e-10, atol=1e-12)
    for t in range(5, 12):                            # then one position at a time
        step = m.forward(idx[:, t:t + 1], kv=kv)[0]
        np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-10, atol=1e-12)
    assert kv.t == 12
    with pytest.raises(ValueError, match="block_size"):
        m.forward(idx[:, :1], kv=kv)
    if kernels:  # the compiled one-token step (kernels/decode.py) gives the same logits and cache
        fast = KVCache(m, 2)
        m.forward(idx[:, :5], kv=fast)
        for t in range(5, 12):
            np.testing.assert_allclose(fast.step(m, idx[:, t]), full[:, t], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fast.K, kv.K, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fast.V, kv.V, rtol=1e-10, atol=1e-12)


def test_cached_generation_equals_uncached_within_the_block():
    m = numgpt.build_model("preln", dtype=np.float64, seed=2, zero_head=False, block_size=32)
    prompt = np.array([[1, 2, 3]])
    a = generate(m, prompt, 20, rng=np.random.default_rng(5), use_cache=True)
    b = generate(m, prompt, 20, rng=np.random.default_rng(5), use_cache=False)
    np.testing.assert_array_equal(a, b)


def test_cached_generation_runs_past_the_block():
    m = numgpt.build_model("preln", seed=2, block_size=8)
    out = generate(m, np.zeros((3, 20), dtype=int), 30, rng=np.random.default_rng(0))
    assert out.shape == (3, 50) and out.min() >= 0 and out.max() < 65
    bigram = numgpt.build_model("bigram")
    assert generate(bigram, np.zeros((1, 1), dtype=int), 10).shape == (1, 11)


def test_sampling_filters():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    np.testing.assert_allclose(next_token_probs(logits), [[0.5, 0.3, 0.15, 0.05]])
    np.testing.assert_allclose(next_token_probs(logits, top_k=2), [[0.625, 0.375, 0, 0]])
    np.testing.assert_allclose(next_token_probs(logits, top_p=0.7), [[0.625, 0.375, 0, 0]])
    np.testing.assert_allclose(next_token_probs(logits, top_p=0.5), [[1, 0, 0, 0]])
    np.testing.assert_allclose(next_token_probs(logits, temperature=0), [[1, 0, 0, 0]])
    cold = next_token_probs(logits, temperature=0.5)
    np.testing.assert_allclose(cold, np.array([[25, 9, 2.25, 0.25]]) / 36.5)


def test_extreme_logits_and_low_temperature_stay_finite():
    logits = np.array([[1e30, -1e30, 0.0], [3e38, 3e38, -3e38]])
    for temp in (1.0, 1e-6, 1e6):
        p = next_token_probs(logits, temperature=temp)
        assert np.all(np.isfinite(p)) and np.allclose(p.sum(-1), 1)
    assert sample_from(next_token_probs(logits, temperature=1e-6), np.random.default_rng(0))[0] == 0


def test_sampling_follows_the_distribution():
    probs = np.array([[0.2, 0.5, 0.3]])
    rng = np.random.default_rng(0)
    draws = np.array([sample_from(probs, rng)[0] for _ in range(20000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / 20000, probs[0], atol=0.015)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0, 1e-300])
def test_compiled_sampler_draws_what_the_reference_draws(temperature):
    from numgpt.kernels.decode import sample_rows
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((500, 65)) * 4).astype(np.float32)
    want = sample_from(next_token_probs(logits, temperature), np.random.default_rng(7))
    got = np.empty(500, dtype=np.int64)
    sample_rows(logits, temperature, np.random.default_rng(7).random(500), got)
    np.testing.assert_array_equal(got, want)


def test_generation_with_kernels_equals_the_reference_path():
    """The compiled decoder and sampler give the same tokens as the NumPy path, past the block."""
    ref = numgpt.build_model("preln", seed=4, zero_head=False, block_size=16, kernels=False)
    fast = numgpt.build_model("preln", seed=4, zero_head=False, block_size=16, kernels=True)
    prompt = np.array([[5, 6, 7]])
    a = generate(ref, prompt, 60, rng=np.random.default_rng(3))
    b = generate(fast, prompt, 60, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_compiled_runs_draw_what_the_token_by_token_loop_draws(monkeypatch):
    """With the kernels, generate draws and decodes runs of tokens in one compiled call each
    (KVCache.run: up to the next rebuild, at most STREAMED_RUN while streaming to on_token). The
    tokens are those of the token-by-token loop (the same uniforms, drawn in one go), past
    several rebuilds, two rows, streamed or not; on_token sees every token, in order."""
    from numgpt import generate as gen
    m = numgpt.build_model("preln", seed=4, zero_head=False, block_size=16, kernels=True)
    prompt = np.array([[5, 6, 7], [1, 2, 3]])
    sizes, run = [], KVCache.run

    def counted(self, logits, temperature, u):
        sizes.append(u.shape[0])
        return run(self, logits, temperature, u)
    monkeypatch.setattr(KVCache, "run", counted)
    whole = generate(m, prompt, 70, rng=np.random.default_rng(3))
    assert sum(sizes) > 60 and max(sizes) > gen.STREAMED_RUN  # runs to the rebuild
    sizes.clear()
    seen = []
    streamed = generate(m, prompt, 70, rng=np.random.default_rng(3), on_token=seen.append)
    assert sum(sizes) > 60 and max(sizes) <= gen.STREAMED_RUN
    monkeypatch.setattr(KVCache, "ready", lambda self: False)  # token by token
    one_by_one = generate(m, prompt, 70, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(whole, one_by_one)
    np.testing.assert_array_equal(streamed, one_by_one)
    np.testing.assert_array_equal(np.stack(seen, axis=1), one_by_one[:, 3:])
    with pytest.raises(ValueError, match="cannot draw"):  # past the cache: refused
        kv = KVCache(m, 2)
        kv.run(np.zeros((2, 65), np.float32), 1.0, np.zeros((18, 2)))
