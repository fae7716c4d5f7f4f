"""The gradient-check report (python -m numgpt.gradcheck): every layer, AdamW and every preset pass
in float64; its command line; numeric_grad's refusal of arrays it cannot perturb."""
import subprocess
import sys

import numpy as np
import pytest

from numgpt import gradcheck
from numgpt.gradcheck import (LAYER_TOL, LAYERS, MODEL_TOL, check_adamw_rows, check_layer_rows,
                              check_model_grads, check_preset_rows, main, numeric_grad)


@pytest.mark.gradcheck
@pytest.mark.parametrize("layer", list(LAYERS))
def test_every_layer_passes(layer):
    rows = check_layer_rows(layer)
    assert rows and all(r.tensor for r in rows), rows
    for r in rows:
        assert r.passed and r.error <= LAYER_TOL, r
        assert r.norm > 1e-3, r  # a gradient far from zero: the check is not trivial


@pytest.mark.gradcheck
def test_layer_errors_are_the_ones_the_docs_quote(repo):
    # docs/derivations.md#gradient-checking: "Single layers give relative errors of 3e-11 to 3e-9"
    with open(f"{repo}/docs/derivations.md", encoding="utf-8") as f:
        assert "Single layers give relative errors of $3 \\times 10^{-11}$ to $3 \\times 10^{-9}$" in f.read()
    errors = [r.error for n in LAYERS for r in check_layer_rows(n)]
    assert 1e-11 <= min(errors) < 1e-10 and 1e-9 < max(errors) < 1e-8


@pytest.mark.gradcheck
@pytest.mark.parametrize("preset", gradcheck.presets())
def test_every_preset_passes(preset):
    rows = check_preset_rows(preset)
    m = gradcheck.small_model(preset)
    assert [r.tensor for r in rows] == list(m.params)
    for r in rows:
        assert r.passed and r.error <= MODEL_TOL, r
        assert r.norm > 1e-4 * np.sqrt(np.prod(r.shape)), r


@pytest.mark.gradcheck
def test_adamw_matches_its_closed_form():
    rows = check_adamw_rows()
    assert [r.tensor for r in rows] == ["w", "b"]
    assert all(r.passed and r.norm > 0 for r in rows), rows


def test_a_layer_that_raises_or_returns_a_wrong_shape_fails_with_a_note(monkeypatch):
    from numgpt.bugs import swap

    def raises(dy, cache):
        raise NotImplementedError("derive it")

    def wrong_shape(dy, cache):
        x, W, _ = cache
        return dy @ W.T, x.reshape(-1, x.shape[-1]).T @ dy.reshape(-1, dy.shape[-1]), dy.sum(0)

    with swap({"linear_backward": raises}):
        (row,) = check_layer_rows("linear")
    assert not row.passed and row.note == "not written yet (derive it)"
    with swap({"linear_backward": wrong_shape}):
        rows = {r.tensor: r for r in check_layer_rows("linear")}
    assert rows["x"].passed and rows["W"].passed
    assert not rows["b"].passed and "shape (5, 4)" in rows["b"].note


def test_model_check_counts_a_wrong_shaped_gradient_as_wrong():
    from numgpt.bugs import plant
    m = gradcheck.small_model("single_head")
    x = np.zeros((2, 6), dtype=int)
    with plant("bias_unsummed"):
        errors = check_model_grads(m, x, x)
    assert errors["lm_head.b"] == float("inf")
    assert errors["tok_emb"] < 1e-6


def test_numeric_grad_refuses_a_view_it_cannot_perturb():
    a = np.random.default_rng(0).standard_normal((3, 4))
    with pytest.raises(ValueError, match="C-contiguous"):
        numeric_grad(lambda: float(np.sum(a ** 2)), a.T)
    ro = a.copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        numeric_grad(lambda: float(np.sum(ro ** 2)), ro)
    np.testing.assert_allclose(numeric_grad(lambda: float(np.sum(a ** 2)), a), 2 * a.ravel(),
                               rtol=1e-8)


def test_report_command_prints_every_tensor_and_exits_0(capsys):
    assert main(["--layer", "linear", "adamw", "--preset", "bigram"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["check", "tensor", "shape"]
    assert any(l.startswith("layer linear") and " W " not in l and "2x5x6" in l for l in lines)
    assert sum(" pass " in l for l in lines) == 3 + 2 + 1  # x, W, b; w, b; tok_emb
    assert "FAIL" not in out and "float64" in lines[-1]
    assert "each preset's whole model at a small size, vocabulary 11" in out  # laptop's = hour's


def test_report_with_a_planted_bug_names_where_it_is_caught(capsys):
    assert main(["--break", "layernorm_no_var", "--layer", "linear", "--layer", "layernorm"]) == 0
    out = capsys.readouterr().out
    assert "caught layernorm_no_var in: layer layernorm" in out
    assert any(l.startswith("layer layernorm") and "FAIL" in l for l in out.splitlines())
    # run only checks that cannot see it: the report says so and exits 1
    assert main(["--break", "layernorm_no_var", "--layer", "linear"]) == 1
    assert "NOT caught" in capsys.readouterr().out


def test_list_bugs(capsys):
    from numgpt.bugs import CATALOGUE
    assert main(["--list-bugs"]) == 0
    assert [l.split()[0] for l in capsys.readouterr().out.splitlines()] == list(CATALOGUE)


@pytest.mark.parametrize("args,msg", [(["--layer", "nope"], "unknown layer 'nope'"),
                                      (["--preset", "huge"], "unknown preset 'huge'"),
                                      (["--break", "typo"], "unknown bug 'typo'"),
                                      (["--colour"], "unrecognized arguments")])
def test_bad_arguments_give_one_line_and_exit_2(args, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and msg in err


def test_the_module_runs_as_a_command(repo):
    r = subprocess.run([sys.executable, "-m", "numgpt.gradcheck", "--layer", "relu"], cwd=repo,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "layer relu" in r.stdout and r.stderr == ""
    r = subprocess.run([sys.executable, "-m", "numgpt.gradcheck", "--layer", "rleu"], cwd=repo,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1
