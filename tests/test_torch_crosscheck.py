"""Cross-check numgpt's forward and hand-written backward against an independent PyTorch port.

bench/torch_reference.py re-implements every rung of the ladder with torch autograd; here each
preset is built small in float64, its parameters are copied into the torch model, and the loss,
the logits and every parameter gradient must agree to near machine precision.

Skipped when torch is not installed (`pip install -e ".[bench]"` brings it), except under CI
(tests/required.py), where a missing torch fails: CI installs it so that a broken gradient
anywhere fails CI.
"""
import importlib.util
import os
import sys

import numpy as np
import pytest
from required import may_not_skip

if may_not_skip():
    import torch  # CI installs the bench extra: a missing torch is an error there, not a skip
else:
    torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numgpt  # noqa: E402


def _load_reference():
    """bench/torch_reference.py as a module (bench/ is a folder of scripts, not a package)."""
    path = os.path.join(ROOT, "bench", "torch_reference.py")
    spec = importlib.util.spec_from_file_location("numgpt_torch_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ref = _load_reference()

PRESETS = ["bigram", "single_head", "multi_head", "ffn", "residual", "layernorm", "preln",
           "laptop", "hour", "scaled"]
ATTENTION = ["explicit", "sdpa"]
LOSS_RTOL = 1e-12
GRAD_RTOL = 1e-10
BATCH = 4


def small_overrides(preset, **extra):
    """The preset shrunk to a size that runs in milliseconds, dropout off. The output layer starts
    random (zero_head=False): at zero it would block every other gradient."""
    kw = dict(vocab_size=13, block_size=6, dropout=0.0, zero_head=False)
    if preset == "bigram":
        kw["n_layer"] = 0
    else:
        kw.update(n_embd=12, n_layer=2, n_head=1 if preset == "single_head" else 3)
    kw.update(extra)
    return kw


def rel_err(a, b):
    """||a - b|| / ||b||, the relative error of a against the reference b."""
    denom = np.linalg.norm(b)
    diff = np.linalg.norm(a - b)
    return diff / denom if denom > 0 else diff


def crosscheck(preset, attention, T=None, seed=0, **extra):
    np_model = numgpt.build_model(preset, seed=seed, dtype=np.float64,
                                  **small_overrides(preset, **extra))
    cfg = np_model.cfg
    tmodel = ref.TorchGPT(cfg, attention=attention).double().eval()
    ref.load_numgpt_params(tmodel, np_model.get_params())

    # the parameters survive the round trip exactly (names, layouts, values)
    back = ref.params_as_numgpt(tmodel)
    params = np_model.get_params()
    assert set(back) == set(params)
    for k in params:
        np.testing.assert_array_equal(back[k], params[k], err_msg=k)

    T = cfg.block_size if T is None else T
    rng = np.random.default_rng(seed + 100)
    x = rng.integers(0, cfg.vocab_size, (BATCH, T))
    y = rng.integers(0, cfg.vocab_size, (BATCH, T))

    logits_np, _ = np_model.forward(x, train=False)
    loss_np, grads_np = np_model.loss_and_grads(x, y, train=False)

    logits_t, loss_t = tmodel(torch.as_tensor(x), torch.as_tensor(y))
    loss_t.backward()
    grads_t = ref.grads_as_numgpt(tmodel)

    assert logits_np.dtype == np.float64
    assert rel_err(logits_np, logits_t.detach().numpy()) < GRAD_RTOL
    lt = loss_t.item()
    assert abs(loss_np - lt) < LOSS_RTOL * max(1.0, abs(lt)), (loss_np, lt)

    assert set(grads_np) == set(grads_t)
    errs = {k: rel_err(grads_np[k], grads_t[k]) for k in grads_t}
    bad = {k: e for k, e in errs.items() if not e < GRAD_RTOL}
    assert not bad, f"gradients differ (relative error by norm): {bad}"
    for k in grads_t:
        assert grads_np[k].shape == grads_t[k].shape, k
        assert np.linalg.norm(grads_t[k]) > 0 or k == "pos_emb", f"{k}: zero gradient"


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_matches_torch(preset, attention, kernels):
    crosscheck(preset, attention, kernels=kernels)


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("preset", ["ffn", "preln", "layernorm"])
def test_gelu_matches_torch(preset, attention):
    crosscheck(preset, attention, activation="gelu")


@pytest.mark.parametrize("preset,extra", [
    ("preln", dict(ffn_mult=2.0, residual=False)),                 # pre-norm without residual
    ("multi_head", dict(norm="post")),                             # post-norm without residual
    ("residual", dict(attn_proj=False, ffn_proj=False, ffn_mult=1.0)),
    ("laptop", dict(n_layer=1, init="torch")),
])
def test_variants_match_torch(preset, extra):
    crosscheck(preset, "explicit", **extra)


@pytest.mark.parametrize("attention", ATTENTION)
def test_shorter_sequence_matches_torch(attention):
    """T < block_size: only the first T rows of pos_emb are used and get gradient."""
    crosscheck("preln", attention, T=4)


def test_dropout_is_off_in_eval_and_on_in_train():
    """With dropout > 0, eval mode still matches numgpt (train=False); train mode differs."""
    np_model = numgpt.build_model("preln", seed=1, dtype=np.float64,
                                  **small_overrides("preln", dropout=0.3))
    rng = np.random.default_rng(7)
    x = rng.integers(0, 13, (BATCH, 6))
    y = rng.integers(0, 13, (BATCH, 6))
    loss_np = np_model.loss(x, y, train=False)
    for attention in ATTENTION:
        tmodel = ref.TorchGPT(np_model.cfg, attention=attention).double()
        ref.load_numgpt_params(tmodel, np_model.get_params())
        with torch.no_grad():
            tmodel.eval()
            _, loss_eval = tmodel(torch.as_tensor(x), torch.as_tensor(y))
            tmodel.train()
            torch.manual_seed(0)
            _, loss_train = tmodel(torch.as_tensor(x), torch.as_tensor(y))
        assert abs(loss_eval.item() - loss_np) < LOSS_RTOL * max(1.0, abs(loss_np))
        assert abs(loss_train.item() - loss_np) > 1e-6


def test_load_rejects_mismatched_params():
    np_model = numgpt.build_model("preln", dtype=np.float64, **small_overrides("preln"))
    tmodel = ref.TorchGPT(np_model.cfg).double()
    params = np_model.get_params()
    del params["lm_head.b"]
    with pytest.raises(ValueError, match="lm_head.b"):
        ref.load_numgpt_params(tmodel, params)
