"""The exercises (python -m numgpt.exercises): the learner's copy follows the real layers, every
exercise fails while blank and passes with the reference, one at a time and all together, and
the checker runs the model and the two short trainings on the learner's code."""
import ast
import io
import os
import subprocess
import sys

import pytest

import numgpt.layers
from numgpt import gradcheck
from numgpt.exercises import (FILES, LAYERS_DIR, USES, ExerciseError, backward_functions, check,
                              load_learner, reference_backward_names, write_exercises)
from numgpt.exercises.__main__ import main

BACKWARDS = [n for n in numgpt.layers.__all__ if n.endswith("_backward")]


def layer_results(folder):
    """layer -> passed, for the report's layer checks run on the learner's code in folder."""
    from numgpt.bugs import swap
    with swap(load_learner(folder)):
        rows = gradcheck.run_report(layers=list(gradcheck.LAYERS))
    return {n: all(r.passed for r in rows if r.name == n) for n in gradcheck.LAYERS}


def test_every_backward_of_the_layers_is_an_exercise():
    assert sorted(reference_backward_names()) == sorted(BACKWARDS)
    assert set(gradcheck.LAYERS) == set(USES)
    assert sorted(u[0] for u in USES.values()) == sorted(BACKWARDS)


def test_the_copy_is_the_real_layers_with_only_the_backward_bodies_blank(tmp_path):
    write_exercises(str(tmp_path / "ex"))
    for f in FILES:
        with open(os.path.join(LAYERS_DIR, f + ".py"), encoding="utf-8") as fh:
            real = ast.parse(fh.read())
        with open(tmp_path / "ex" / (f + ".py"), encoding="utf-8") as fh:
            mine = ast.parse(fh.read())
        assert ast.get_docstring(mine) == ast.get_docstring(real)
        assert len(mine.body) == len(real.body)
        for a, b in zip(mine.body, real.body):
            if isinstance(b, ast.FunctionDef) and b.name.endswith("_backward"):
                assert a.name == b.name and ast.get_docstring(a) == ast.get_docstring(b)
                assert ast.dump(a.args) == ast.dump(b.args)
                (stmt,) = a.body[1:]  # the docstring, then one raise naming the derivation
                assert isinstance(stmt, ast.Raise)
                msg = stmt.exc.args[0].value
                assert msg.startswith(f"derive {b.name}: see docs/derivations.md#")
            else:  # everything else is the real code, unchanged
                assert ast.dump(a) == ast.dump(b)


def test_every_anchor_named_is_a_section_of_the_derivations(repo):
    import re
    with open(os.path.join(repo, "docs", "derivations.md"), encoding="utf-8") as f:
        heads = [l.lstrip("#").strip() for l in f if l.startswith("#")]
    anchors = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in heads}
    for f in FILES:
        with open(os.path.join(LAYERS_DIR, f + ".py"), encoding="utf-8") as fh:
            for name, *_, anchor in backward_functions(fh.read()):
                assert anchor in anchors, (name, anchor)


@pytest.mark.gradcheck
def test_blank_fails_every_layer_and_the_reference_passes_every_layer(tmp_path):
    write_exercises(str(tmp_path / "blank"))
    write_exercises(str(tmp_path / "ref"), blank=())
    assert not any(layer_results(str(tmp_path / "blank")).values())
    assert all(layer_results(str(tmp_path / "ref")).values())


@pytest.mark.gradcheck
@pytest.mark.parametrize("func", BACKWARDS)
def test_each_exercise_alone_fails_while_blank(tmp_path, func):
    write_exercises(str(tmp_path / "ex"), blank={func})
    results = layer_results(str(tmp_path / "ex"))
    users = {layer for layer, uses in USES.items() if func in uses}
    assert users and {n for n, ok in results.items() if not ok} == users


def test_init_refuses_to_overwrite_work_without_force(tmp_path, capsys):
    folder = str(tmp_path / "ex")
    assert main(["init", folder]) == 0
    assert "linear_backward" in capsys.readouterr().out
    mine = os.path.join(folder, "linear.py")
    with open(mine, "a", encoding="utf-8") as f:
        f.write("# my work\n")
    assert main(["init", folder]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err
    with open(mine, encoding="utf-8") as f:
        assert f.read().endswith("# my work\n")
    assert main(["init", folder, "--force"]) == 0
    with open(mine, encoding="utf-8") as f:
        assert "# my work" not in f.read()


def test_check_of_blank_exercises_fails_with_a_hint_per_layer(tmp_path):
    folder = str(tmp_path / "ex")
    write_exercises(folder)
    out = io.StringIO()
    assert check(folder, out=out) is False
    text = out.getvalue()
    assert text.count("hint: read docs/derivations.md#") == len(gradcheck.LAYERS)
    assert "not written yet (derive linear_backward: see docs/derivations.md#linear)" in text
    assert "12 of 12 layers to go" in text and "preset" not in text


def test_a_wrong_answer_gets_the_hint_of_its_section(tmp_path):
    folder = str(tmp_path / "ex")
    write_exercises(folder, blank=("layernorm_backward",))
    path = os.path.join(folder, "layernorm.py")
    with open(path, encoding="utf-8") as f:
        src = f.read()
    wrong = ("    xhat, rstd, g = cache\n    dxhat = dy * g\n"
             "    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True))\n"
             "    return dx, (dy * xhat).reshape(-1, g.size).sum(0), dy.reshape(-1, g.size).sum(0)\n")
    start = src.index('    raise NotImplementedError("derive layernorm_backward')
    src = src[:start] + wrong + src[src.index("\n", start) + 1:]
    with open(path, "w", encoding="utf-8") as f:
        f.write(src)
    out = io.StringIO()
    assert check(folder, out=out) is False
    text = out.getvalue()
    assert "1 of 12 layers to go: layernorm" in text
    assert "hint: read docs/derivations.md#layernorm" in text and "variance" in text


def _answer(folder, file, func, body):
    """Replace the blank body of func in folder/file with body (lines indented 4)."""
    path = os.path.join(folder, file)
    with open(path, encoding="utf-8") as f:
        src = f.read()
    start = src.index(f'    raise NotImplementedError("derive {func}')
    src = src[:start] + body + src[src.index("\n", start) + 1:]
    with open(path, "w", encoding="utf-8") as f:
        f.write(src)
    return src[:start].count("\n")  # the 0-based line of the body's first line


@pytest.mark.parametrize("body,said", [
    ("    x, W, has_bias = cache\n"
     "    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])\n"
     "    dx = (dy2 @ W.T).reshape(x.shape) * float('nan')\n"
     "    return dx, x2.T @ dy2, dy2.sum(axis=0) if has_bias else None\n",
     "the gradient holds NaN or inf"),
    ("    x, W, has_bias = cache\n    return dy @ W, None, None\n", "(at linear.py:{line})"),
])
def test_a_gradient_that_is_nan_or_a_crash_is_said_with_where(tmp_path, body, said):
    """A NaN gradient once showed FAIL with no reason; a learner's exception, no line."""
    folder = str(tmp_path / "ex")
    write_exercises(folder, blank=("linear_backward",))
    line = _answer(folder, "linear.py", "linear_backward", body) + 2  # dy @ W: the body's 2nd
    out = io.StringIO()
    assert check(folder, out=out, train=False) is False
    text = out.getvalue()
    assert said.format(line=line) in text, text


def test_check_of_the_reference_passes_the_model_and_trains_like_it(tmp_path, text_file):
    folder = str(tmp_path / "ex")
    write_exercises(folder, blank=())
    out = io.StringIO()
    assert check(folder, presets=["bigram", "preln"], data=text_file, steps=20, out=out)
    text = out.getvalue()
    assert "preset preln" in text and "FAIL" not in text
    runs = [l.split() for l in text.splitlines() if "reference" in l and "val loss" in l]
    assert [r[0] for r in runs] == ["bigram", "single_head"]
    for r in runs:
        assert r[3] == r[5] and r[6] == "same"  # same numbers: the same computation


def test_learner_code_that_does_not_import_is_one_line_and_exit_2(tmp_path, capsys):
    folder = str(tmp_path / "ex")
    write_exercises(folder)
    with open(os.path.join(folder, "activations.py"), "a", encoding="utf-8") as f:
        f.write("def oops(:\n")
    with pytest.raises(ExerciseError, match=r"activations\.py:\d+"):
        load_learner(folder)
    assert main(["check", folder]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "activations.py" in err


@pytest.mark.parametrize("args,msg", [(["check", "no-such-folder"], "holds no exercises"),
                                      (["check", "--data", "/no/such.txt"], "not found"),
                                      (["init", ""], "the folder's name is empty"),
                                      (["check", "--steps", "0"], "--steps"),
                                      (["check", "--preset", "huge"], "unknown preset")])
def test_bad_check_arguments_give_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, msg):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and msg in err


def test_the_package_runs_as_a_command(tmp_path, repo):
    env = dict(os.environ, PYTHONPATH=repo)
    r = subprocess.run([sys.executable, "-m", "numgpt.exercises", "init", "mine"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and os.path.isfile(tmp_path / "mine" / "attention.py")
    r = subprocess.run([sys.executable, "-m", "numgpt.exercises"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
