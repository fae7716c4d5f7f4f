"""Looking inside: the attention-map command, the ladder's maps, the measurements behind the
1/sqrt(head size) scale and pre-norm (numgpt/why.py), the worked example at T = 3 and the shape
table (docs/ladder.md, docs/shapes.md)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from numgpt.attention_map import attention_probs, main as attention_main
from numgpt.config import get_config
from numgpt.data import load_dataset
from numgpt.layers import softmax
from numgpt.trainer import train
from numgpt import why

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, *args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


@pytest.fixture
def small_run(text_file, tmp_path):
    """A 2-layer, 2-head model trained for a few steps on the reference layers; its out_dir."""
    cfg = get_config("preln", n_layer=2, n_head=2, n_embd=16, block_size=12, batch_size=4,
                     max_iters=20, eval_interval=20, eval_iters=2, kernels=False)
    out = str(tmp_path / "run")
    train(cfg, load_dataset(text_file), out, quiet=True, sample_chars=0)
    return out


# ---- attention maps ----

def test_attention_probs_are_the_models_softmax(small_run):
    from numgpt.checkpoint import read_model_checkpoint
    from numgpt.data import Vocab
    cfg, chars, params, _, _ = read_model_checkpoint(os.path.join(small_run, "ckpt.npz"))
    ids = Vocab(chars).encode("to be or not")
    P = attention_probs(cfg, params, ids)
    T, hs = len(ids), cfg.head_size
    assert P.shape == (cfg.n_layer, cfg.n_head, T, T)
    assert np.allclose(P.sum(-1), 1.0) and np.all(P[..., np.triu_indices(T, 1)[0],
                                                      np.triu_indices(T, 1)[1]] == 0)
    # block 0 by hand: x = tok + pos, LN1, q and k, softmax(q k^T / sqrt(hs)) under the mask
    p = {k: v.astype(np.float64) for k, v in params.items()}
    x = p["tok_emb"][ids] + p["pos_emb"][:T]
    xh = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    h = xh * p["blocks.0.ln1.g"] + p["blocks.0.ln1.b"]
    q, k = h @ p["blocks.0.attn.w_q"], h @ p["blocks.0.attn.w_k"]
    for head in range(cfg.n_head):
        sl = slice(head * hs, (head + 1) * hs)
        s = q[:, sl] @ k[:, sl].T / np.sqrt(hs)
        s[np.triu_indices(T, 1)] = -np.inf
        assert np.allclose(P[0, head], softmax(s), atol=1e-10)


def test_attention_map_command(small_run, tmp_path, capsys):
    png = str(tmp_path / "a.png")
    text = "to be or not to be that is"  # longer than block_size 12: the last 12 are used
    assert attention_main([f"--out_dir={small_run}", f"--text={text}", f"--png={png}"]) == 0
    out = capsys.readouterr().out
    assert "using its last 12" in out and repr(text[-12:]) in out
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    before = os.path.getmtime(png), os.path.getsize(png)
    r = run_module("numgpt.attention_map", f"--out_dir={small_run}", "--text=to be", f"--png={png}")
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    assert (os.path.getmtime(png), os.path.getsize(png)) == before  # not written over
    r = run_module("numgpt.attention_map", f"--out_dir={small_run}", "--text=to be", f"--png={png}",
                   "--overwrite")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args, message", [
    (["--text=to bß"], "not in the vocabulary"),
    (["--text="], "--text is empty"),
    (["--png=x.jpg"], "must name a .png"),
    (["--colour=red"], "unknown option --colour"),
    (["--png=/no/such/folder/a.png"], "does not exist"),
    (["--png="], "--png is empty"),  # (once: the default, silently)
    (["--bogus"], "unknown option --bogus"),  # (once: '--bogus needs a value')
])
def test_attention_map_bad_input_is_one_line(small_run, tmp_path, args, message):
    r = run_module("numgpt.attention_map", f"--out_dir={small_run}", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(small_run, "attention.png"))


def test_attention_map_refuses_missing_checkpoint_and_bigram(text_file, tmp_path):
    r = run_module("numgpt.attention_map", f"--out_dir={tmp_path / 'none'}")
    assert r.returncode == 2 and "no checkpoint" in r.stderr
    cfg = get_config("bigram", max_iters=2, eval_interval=2, eval_iters=1, batch_size=2)
    train(cfg, load_dataset(text_file), str(tmp_path / "bg"), quiet=True, sample_chars=0)
    r = run_module("numgpt.attention_map", f"--out_dir={tmp_path / 'bg'}", "--text=to be")
    assert r.returncode == 2 and "no attention" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_ladder_writes_a_map_for_each_attention_rung(text_file, tmp_path, capsys):
    from numgpt import ladder
    lad = tmp_path / "lad"
    assert ladder.main(["--stages=bigram,single_head", "--iters-scale=0.002", f"--data={text_file}",
                        f"--out-dir={lad}"]) == 0
    assert (lad / "single_head-seed1337" / "attention.png").is_file()
    assert not (lad / "bigram-seed1337" / "attention.png").exists()  # no attention in a bigram
    assert "attention maps: " + str(lad / "single_head-seed1337" / "attention.png") in \
        capsys.readouterr().out


# ---- why 1/sqrt(head size), why pre-norm (numgpt/why.py) ----

def test_the_scale_keeps_the_softmax_unsaturated():
    for hs in (8, 64):
        r = why.unit_qk_saturation(hs, T=16, n_rows=16)
        assert abs(r["std_scaled"] - 1) < 0.1 and r["std_raw"] > 2
        assert r["scaled"]["entropy"] > r["unscaled"]["entropy"] + 0.3
        assert r["scaled"]["max_p"] < r["unscaled"]["max_p"]
        assert r["scaled"]["saturated"] < r["unscaled"]["saturated"]
    big = why.unit_qk_saturation(64, T=16, n_rows=16)["unscaled"]
    small = why.unit_qk_saturation(8, T=16, n_rows=16)["unscaled"]
    assert big["saturated"] > small["saturated"]  # unscaled, it gets worse as heads get bigger
    for row in why.model_saturation(get_config("preln"), batch=2, seeds=[0]):
        assert row["scaled"]["entropy"] > row["unscaled"]["entropy"]


def test_pre_norm_stream_gradient_never_shrinks_post_norm_does():
    for L in (3, 6):
        _, pre = why.block_grads(get_config("preln", n_layer=L, norm="pre"), batch=4, seed=0)
        _, post = why.block_grads(get_config("preln", n_layer=L, norm="post"), batch=4, seed=0)
        assert np.all(pre >= 1) and np.all(np.diff(pre) <= 0)  # grows on the way down
        assert post[0] < 0.8 and post.min() < pre.min()


def test_why_command_prints_the_tables():
    r = run_module("numgpt.why", "--quick", "--seeds=1")
    assert r.returncode == 0, r.stderr
    for heading in ("1. The attention softmax", "2. Gradient norms", "| post | 3 |", "| pre | 6 |"):
        assert heading in r.stdout
    r = run_module("numgpt.why", "--seeds=0")
    assert r.returncode == 2 and r.stderr.startswith("error: --seeds")


# ---- the worked example at T = 3 and the shape table (docs/shapes.md) ----

def doc_block(path, first_line):
    """The fenced block of a doc that starts with first_line (without the fences)."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        text = f.read()
    start = text.index(first_line)
    return text[start:text.index("```", start)]


def test_worked_example_numbers_and_checks():
    from numgpt import worked_example as we
    r = we.steps()
    P = r["P = softmax(S masked) by rows"]
    assert np.allclose(P[0], [1, 0, 0]) and np.all(P[np.triu_indices(3, 1)] == 0)
    assert np.isclose(P[1, 0], 1 / (1 + np.exp(2 ** -0.5)))  # softmax of [0, 1/sqrt(2)]
    ds = r["dS = P * (dP - rowsum(dP * P))"]
    assert np.all(ds[np.triu_indices(3, 1)] == 0) and np.allclose(ds.sum(1), 0)
    assert r["dP = dO v^T"][0, 2] != 0  # ... while dP there is not 0
    lib, fd = we.checks(r)
    assert lib < 1e-12 and fd < 1e-8
    # the check catches a wrong backward: a dQ without the scale is far from finite differences
    bad = dict(r, **{"dQ = alpha dS k": ds @ we.K})
    assert we.checks(bad)[1] > 1e-3


def test_worked_example_output_is_the_one_in_the_doc():
    r = run_module("numgpt.worked_example")
    assert r.returncode == 0, r.stderr
    assert "agrees to below 1e-12; finite differences (h = 1e-6) to below 1e-08" in r.stdout
    assert doc_block("docs/shapes.md", "Causal attention, one head, T = 3") == r.stdout
    r = run_module("numgpt.worked_example", "--T=4")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_shape_walk_checks_every_symbol():
    from numgpt import shapes
    # every symbol a different number, T < block_size, so a wrong letter in the table is caught
    cfg = get_config("preln", n_embd=12, n_head=3, block_size=7, ffn_mult=2.0)
    tb = shapes.walk(cfg, B=2, T=5)
    rows = [row for _, _, rs in tb.sections for row in rs]
    assert len(rows) > 60 and ("`pos_emb`", "[Tmax, C]", "7×12", rows[1][3]) == rows[1]
    tb.section("x", ("a", "b"))
    with pytest.raises(AssertionError):
        tb.add("wrong", "B, C, T", np.zeros((2, 5, 12)))
    r = run_module("numgpt.shapes", "--preset=ffn")
    assert r.returncode == 2 and "pre-norm" in r.stderr


def test_shape_table_in_the_doc_is_the_commands_output():
    r = run_module("numgpt.shapes")
    assert r.returncode == 0, r.stderr
    with open(os.path.join(REPO, "docs/shapes.md"), encoding="utf-8") as f:
        assert r.stdout.strip() in f.read()


def test_ladder_doc_quotes_what_why_prints():
    """docs/ladder.md's tables of numgpt.why, recomputed at full size (all but the scaled rung's
    saturation, which takes minutes), must be in the doc line for line."""
    import io
    seeds = range(5)
    cfg = get_config("preln")
    res = {"unit": [(hs, T, why.unit_qk_saturation(hs, T, n_rows=64))
                    for hs, T in [(8, 8), (16, 64), (64, 256)]],
           "models": [("preln", cfg, why.model_saturation(cfg, 4, seeds))],
           "grads": why.grad_norm_table("preln", [3, 12], 32, seeds),
           "grad_setup": ([3, 12], 32, list(seeds))}
    buf = io.StringIO()
    why.report(res, buf)
    rows = [line for line in buf.getvalue().splitlines() if line.startswith("| ")
            and not line.startswith("| hs") and not line.startswith("| norm")
            and not line.startswith("| block")]
    assert len(rows) == 3 + 3 + 4 + 4
    with open(os.path.join(REPO, "docs/ladder.md"), encoding="utf-8") as f:
        doc = f.read().splitlines()
    for row in rows:
        assert row in doc, row
