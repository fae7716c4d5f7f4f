"""The fused training step (kernels/step.py through numgpt.parallel.FusedStep): the same loss and
gradients as the layer-by-layer reference, checked against central differences in float64,
for every kind of block the ladder builds; and the one-call clip and AdamW it feeds."""
import numpy as np
import pytest

import numgpt
from numgpt import parallel
from numgpt.env import EnvError
from numgpt.gradcheck import numeric_grad, rel_error, sample_indices
from numgpt.optim import ListedGrads

# (preset, overrides): every switch of the GPT block that the fused step handles
CASES = [
    ("residual", {}),                                          # the bench's tiny config
    ("single_head", {}),                                       # one head, no projection, no ffn
    ("multi_head", {}),                                        # the same with 4 heads
    ("layernorm", {"n_head": 1}),                              # post-norm, attention in BLAS
    ("ffn", {}),                                               # ffn without its output layer
    ("layernorm", {"activation": "gelu"}),                     # post-norm
    ("preln", {"activation": "gelu", "n_head": 2}),            # pre-norm
    ("preln", {"residual": False, "attn_proj": False}),
    ("laptop", {"n_layer": 2, "n_embd": 16, "block_size": 12, "batch_size": 3}),
    ("laptop", {"n_layer": 2, "n_embd": 16, "block_size": 21, "batch_size": 3}),
    ("laptop", {"n_layer": 2, "n_embd": 32, "block_size": 40, "batch_size": 3}),
]
# every case runs with attention in lanes and per head in BLAS (the fused_lanes and fused steps)
LANES = pytest.mark.parametrize("lanes", [True, False], ids=["lanes", "blas"])


def _model(preset, kw, dtype, seed=0):
    cfg = numgpt.get_config(preset, vocab_size=13, **kw)
    m = numgpt.GPT(cfg, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    for p in m.params.values():  # away from the zero head and unit gains: every path matters
        p += rng.normal(0, 0.1, p.shape).astype(dtype)
    return m


def _batch(cfg, seed=0, T=None):
    rng = np.random.default_rng(seed)
    shape = (cfg.batch_size, T or cfg.block_size)
    return rng.integers(0, cfg.vocab_size, shape), rng.integers(0, cfg.vocab_size, shape)


@LANES
@pytest.mark.parametrize("preset,kw", CASES)
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_fused_step_equals_the_reference(preset, kw, shards, lanes):
    m = _model(preset, kw, np.float32)
    x, y = _batch(m.cfg)
    loss, grads = parallel.FusedStep(m, shards=shards, lanes=lanes)(x, y)
    ref_loss, ref = m.loss_and_grads(x, y)
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    assert list(grads) == list(ref)
    for k in ref:
        assert grads[k].shape == ref[k].shape and grads[k].dtype == np.float32
        np.testing.assert_allclose(grads[k], ref[k], rtol=2e-4, atol=2e-6 * np.abs(ref[k]).max(),
                                   err_msg=k)


@LANES
@pytest.mark.parametrize("preset,kw", CASES)
def test_fused_step_gradient_check_float64(preset, kw, lanes):
    """Central differences of the reference loss against the fused step's gradients."""
    m = _model(preset, kw, np.float64, seed=3)
    cfg = m.cfg.replace(batch_size=3)
    x, y = _batch(cfg, seed=4)
    loss, grads = parallel.FusedStep(m, shards=2, lanes=lanes)(x, y)
    pick = np.random.default_rng(0)
    for name, p in m.params.items():
        ix = sample_indices(p.size, 12, pick)
        num = numeric_grad(lambda: m.loss(x, y), p, 1e-6, ix)
        err = rel_error(grads[name].reshape(-1)[ix], num, 1e-4)
        assert err < 1e-6, (name, err)
    assert abs(loss - m.loss(x, y)) < 1e-12


@LANES
@pytest.mark.parametrize("preset", ["preln", "single_head"])
def test_short_sequences_odd_batches_and_one_row(preset, lanes):
    m = _model(preset, {}, np.float64)
    for B, T in ((1, 8), (5, 3), (7, 1)):
        x, y = _batch(m.cfg.replace(batch_size=B), seed=B, T=T)
        loss, grads = parallel.FusedStep(m, shards=2, lanes=lanes)(x, y)
        ref_loss, ref = m.loss_and_grads(x, y)
        assert abs(loss - ref_loss) < 1e-12
        for k in ref:
            np.testing.assert_allclose(grads[k], ref[k], rtol=1e-9, atol=1e-12, err_msg=k)


def test_bad_ids_and_shapes_are_refused_before_the_kernel():
    m = _model("residual", {}, np.float32)
    step = parallel.FusedStep(m)
    x, y = _batch(m.cfg)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        step(x, np.where(y == 0, 13, y))
    with pytest.raises(ValueError, match="exceeds block_size"):
        step(np.zeros((2, 9), dtype=int), np.zeros((2, 9), dtype=int))
    with pytest.raises(ValueError, match="targets have shape"):
        step(x, y[:, :4])


def test_grads_follow_replaced_parameters_and_are_reused():
    """set_params swaps the arrays (a resume does): the step must read the new ones."""
    m = _model("residual", {}, np.float64)
    step = parallel.FusedStep(m)
    x, y = _batch(m.cfg)
    loss1, g1 = step(x, y)
    first = {k: v.copy() for k, v in g1.items()}
    new = {k: v * 0.5 for k, v in m.params.items()}
    m.set_params(new)
    loss2, g2 = step(x, y)
    ref_loss, ref = m.loss_and_grads(x, y)
    assert abs(loss2 - ref_loss) < 1e-12 and abs(loss2 - loss1) > 1e-6
    for k in ref:
        np.testing.assert_allclose(g2[k], ref[k], rtol=1e-9, atol=1e-12)
    assert any(not np.allclose(first[k], g2[k]) for k in ref)


def test_listed_clip_and_adamw_equal_the_per_tensor_path():
    """The same gradients, once as the fused step's ListedGrads (one compiled call each for the
    norm, the clip and AdamW) and once as a plain dict (a call per tensor)."""
    m = _model("preln", {}, np.float32)
    x, y = _batch(m.cfg)
    twin = numgpt.GPT(m.cfg, dtype=np.float32, params=m.get_params())
    opt_a = numgpt.make_optimizer(m, m.cfg.replace(weight_decay=0.1))
    opt_b = numgpt.make_optimizer(twin, m.cfg.replace(weight_decay=0.1))
    step = parallel.FusedStep(m)
    for it in range(3):
        _, ga = step(x, y)
        assert isinstance(ga, ListedGrads)
        gb = {k: v.copy() for k, v in ga.items()}
        na = numgpt.clip_grad_norm(ga, 0.05)
        nb = numgpt.clip_grad_norm(gb, 0.05)
        assert nb > 0.05 and abs(na - nb) < 1e-5 * nb
        for k in gb:
            np.testing.assert_allclose(ga[k], gb[k], rtol=1e-5, atol=1e-9)
        opt_a.step(ga, lr=1e-2)
        assert opt_a._lists[0][0] is not None  # the one-call path ran (it builds these lists)
        opt_b.step(gb, lr=1e-2)
        for k in m.params:
            np.testing.assert_allclose(m.params[k], twin.params[k], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(opt_a.v[k], opt_b.v[k], rtol=1e-4, atol=1e-12)
        for k in m.params:  # the next step from the same point
            twin.params[k][...] = m.params[k]
    assert opt_a.t == opt_b.t == 3
    assert not np.allclose(m.params["tok_emb"], _model("preln", {}, np.float32).params["tok_emb"])


def test_the_fused_step_is_a_candidate_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    for var in ("NUMGPT_FUSED", "NUMGPT_DATA_PARALLEL", "NUMGPT_STEP"):
        monkeypatch.delenv(var, raising=False)
    tiny = numgpt.get_config("residual")
    assert parallel.candidates(tiny) == ["fused_lanes", "fused", "sharded", "one_blas", "plain"]
    for cfg in (tiny.replace(dropout=0.1), tiny.replace(kernels=False), numgpt.get_config("bigram")):
        assert not set(parallel.FUSED) & set(parallel.candidates(cfg))
    monkeypatch.setenv("NUMGPT_FUSED", "0")
    assert "fused" not in parallel.candidates(tiny)
    monkeypatch.setenv("NUMGPT_STEP", "fused")
    with pytest.raises(EnvError, match="NUMGPT_STEP=fused cannot train this model"):
        parallel.candidates(tiny)
    monkeypatch.delenv("NUMGPT_FUSED")
    assert parallel.candidates(tiny) == ["fused"]
    step, close, name = parallel.step_function(numgpt.GPT(tiny), tiny)
    assert name == "fused" and isinstance(step, parallel.FusedStep) and not step.lanes
    close()
    monkeypatch.setenv("NUMGPT_STEP", "fused_lanes")
    step, close, name = parallel.step_function(numgpt.GPT(tiny), tiny)
    assert name == "fused_lanes" and step.lanes
    close()
    with pytest.raises(ValueError, match="no dropout"):
        parallel.FusedStep(numgpt.GPT(tiny.replace(dropout=0.1)))


@pytest.mark.parametrize("forced", ["fused", "sharded", "plain"])
def test_the_api_trains_with_the_step_train_py_takes(monkeypatch, forced):
    """numgpt.training_step(model) is the step train.py chooses (here forced by NUMGPT_STEP), and
    gives model.loss_and_grads's loss and gradients."""
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    monkeypatch.setenv("NUMGPT_STEP", forced)
    m = _model("residual", {}, np.float32)
    x, y = _batch(m.cfg)
    said = []
    with numgpt.training_step(m, say=said.append) as step:
        loss, grads = step(x, y, rng=np.random.default_rng(0))
    assert step.name == forced and said == [f"step: {forced} (NUMGPT_STEP)"]
    ref_loss, ref = m.loss_and_grads(x, y, rng=np.random.default_rng(0))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(grads) == set(ref)
    for k in ref:
        np.testing.assert_allclose(grads[k], ref[k], rtol=1e-3, atol=1e-6)


def test_the_api_step_is_the_cached_choice(monkeypatch):
    """Unforced, numgpt.training_step measures (or reads) the choice train.py would take."""
    monkeypatch.delenv("NUMGPT_STEP", raising=False)
    m = _model("residual", {}, np.float32)
    with numgpt.training_step(m) as step:
        assert step.name in parallel.candidates(m.cfg)
    assert parallel.planned_step(m.cfg) == step.name  # cached now: train.py would take it


def test_blas_runs_on_one_thread_inside_the_fused_step(monkeypatch):
    from threadpoolctl import threadpool_info
    m = _model("residual", {}, np.float32)
    step = parallel.FusedStep(m)
    seen = []
    import numgpt.kernels.step as ks

    class Spy:
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, *a):
            seen.append([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])
            return self.fn(*a)
    spy = Spy(ks.train_step)
    spy.serial = Spy(ks.train_step.serial)
    monkeypatch.setattr(ks, "train_step", spy)
    step(*_batch(m.cfg))
    assert seen and seen[0] and all(n == 1 for n in seen[0])


def test_listed_grads_forget_their_list_when_an_entry_is_replaced():
    """A replaced entry is not in the typed list: clip and AdamW must then see the dict."""
    m = _model("residual", {}, np.float32)
    _, g = parallel.FusedStep(m)(*_batch(m.cfg))
    g["lm_head.b"] = np.full_like(g["lm_head.b"], 1e3)
    assert g.flat is None
    assert numgpt.clip_grad_norm(g, 0) >= 1e3 * np.sqrt(g["lm_head.b"].size)
    _, g = parallel.FusedStep(m)(*_batch(m.cfg))
    g.update({})
    assert g.flat is None
