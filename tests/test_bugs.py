"""Every bug of the catalogue (numgpt/bugs.py) is caught by the report, exactly where the catalogue
says, and planting it changes no code: once the block ends every check passes again."""
import numpy as np
import pytest

import numgpt
from numgpt import gradcheck, layers
from numgpt.bugs import CATALOGUE, plant, swap


def run(check):
    kind, name = check.split()
    if kind == "layer":
        return gradcheck.check_layer_rows(name)
    if kind == "optimizer":
        return gradcheck.check_adamw_rows()
    return gradcheck.check_preset_rows(name)


def test_the_catalogue_holds_the_ten_classic_mistakes():
    assert len(CATALOGUE) == 10
    targets = {b.target for b in CATALOGUE.values()}
    assert targets == {"embedding_backward", "attention_backward", "linear_backward",
                       "dropout_backward", "layernorm_backward", "gelu_backward",
                       "residual_backward", "AdamW.step"}


@pytest.mark.gradcheck
@pytest.mark.parametrize("bug", list(CATALOGUE))
def test_the_report_catches_the_bug(bug):
    entry = CATALOGUE[bug]
    for check in entry.caught_by:  # the right code passes these checks ...
        assert all(r.passed for r in run(check)), check
    with plant(bug):
        for check in entry.caught_by:  # ... the bug fails them, by a clear margin
            rows = run(check)
            bad = [r for r in rows if not r.passed]
            assert bad, f"{bug} not caught by {check}"
            assert all(r.note or r.error > 1e-3 for r in bad), bad
        # and layers that do not use the broken function still pass
        users = {c.split()[1] for c in entry.caught_by}
        for name in ("linear", "embedding", "layernorm"):
            if name not in users:
                assert all(r.passed for r in gradcheck.check_layer_rows(name)), (bug, name)
    for check in entry.caught_by:  # the swap is undone
        assert all(r.passed for r in run(check)), check


@pytest.mark.parametrize("bug,preset,tensor", [
    ("layernorm_no_var", "preln", "blocks.0.ln1.g"),
    ("residual_no_skip", "residual", "tok_emb"),
    ("embedding_fancy_index", "single_head", "tok_emb"),
    ("softmax_dropped_probs", "multi_head", "blocks.0.attn.w_q"),
])
def test_a_planted_bug_reaches_the_whole_model(bug, preset, tensor):
    with plant(bug):
        rows = {r.tensor: r for r in gradcheck.check_preset_rows(preset)}
    assert not rows[tensor].passed and rows[tensor].error > 1e-3
    assert rows["lm_head.w"].passed  # the head sits after every broken layer


def test_swap_rebinds_every_reference_and_restores_it():
    from numgpt import model, ops
    from numgpt.layers import activations, attention, feedforward
    calls = []
    real = layers.linear_backward

    def spy(dy, cache):
        calls.append(1)
        return real(dy, cache)
    real_gelu = layers.gelu_backward
    with swap({"linear_backward": spy, "gelu_backward": lambda d, c: real_gelu(d, c)}):
        for mod in (layers, model, attention, feedforward):
            assert mod.linear_backward is spy
        assert activations.ACTIVATIONS["gelu"][1] is not real_gelu
        m = numgpt.build_model("residual", dtype=np.float64, kernels=False, n_layer=1)
        x = np.zeros((1, 4), dtype=int)
        m.loss_and_grads(x, x)
        # lm_head, w_q, w_k, w_v, w_proj, w_fc, w_out: seven linear layers, all through the spy
        assert len(calls) == 7
    assert layers.linear_backward is real
    assert model.linear_backward is real and attention.linear_backward is real
    assert activations.ACTIVATIONS["gelu"][1] is real_gelu
    assert ops.REFERENCE.layernorm_backward is layers.layernorm_backward


def test_swap_refuses_an_unknown_name_and_undoes_what_it_did():
    real = layers.linear_backward
    with pytest.raises(KeyError):
        with swap({"linear_backward": None, "no_such_backward": None}):
            pass
    assert layers.linear_backward is real
