"""The loss over the whole validation text (numgpt.trainer.whole_text_loss): a run's last
evaluation logs it, bench/whole_val.py prints it for a checkpoint; checked against one window at a
time, and its cut of the text into windows."""
import json
import os
import re
import subprocess
import sys

import numpy as np

from numgpt import GPT
from numgpt.checkpoint import read_model_checkpoint
from numgpt.data import load_dataset
from numgpt.config import get_config
from numgpt.trainer import text_windows, whole_text_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_windows_cover_every_character_once():
    ids = np.arange(23)
    x, y = text_windows(ids, 5)
    assert x.shape == y.shape == (4, 5)
    assert list(x.ravel()) == list(range(20)) and list(y.ravel()) == list(range(1, 21))


def test_whole_text_loss_is_the_mean_over_windows_in_any_batching():
    cfg = get_config("preln", n_layer=1, n_embd=16, n_head=2, block_size=8, vocab_size=11)
    model = GPT(cfg, seed=3)
    ids = np.random.default_rng(0).integers(0, 11, size=8 * 20 + 5)
    x, y = text_windows(ids, 8)
    each = np.mean([model.loss(x[i:i + 1], y[i:i + 1]) for i in range(len(x))])
    for rows in (1, 3, 7, 20, 64):  # 20 windows: batches that divide them, and ones that do not
        assert abs(whole_text_loss(model, ids, 8, rows) - each) < 1e-5, rows


def test_the_last_evaluation_and_whole_val_equal_the_windows_one_by_one(tmp_path, text_file):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "train.py", f"--data={text_file}", f"--out_dir={out}",
                    "--preset=preln", "--n_layer=1", "--n_embd=16", "--block_size=8",
                    "--batch_size=4", "--max_iters=30", "--eval_iters=2"],
                   cwd=ROOT, check=True, capture_output=True)
    r = subprocess.run([sys.executable, os.path.join("bench", "whole_val.py"), str(out)],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    m = re.search(r"step 30, val over the whole validation text \(([\d,]+) characters\) "
                  r"([\d.]+)$", r.stdout.strip())
    assert m, r.stdout
    cfg, _, params, _, _ = read_model_checkpoint(str(out / "ckpt.npz"))
    model = GPT(cfg, seed=0)
    model.set_params(params)
    val = load_dataset(text_file).val.astype(np.int64)
    n = (len(val) - 1) // cfg.block_size
    each = [model.loss(val[i * 8:i * 8 + 8][None], val[i * 8 + 1:i * 8 + 9][None])
            for i in range(n)]
    assert int(m.group(1).replace(",", "")) == n * 8
    assert abs(float(m.group(2)) - np.mean(each)) < 1e-4
    with open(out / "log.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert rows[-1]["step"] == 30  # the run's last evaluation logged the same loss
    assert abs(rows[-1]["val_loss"] - np.mean(each)) < 1e-5
    assert abs(rows[0]["val_loss"] - np.mean(each)) > 1e-3  # the others: eval_iters batches


def test_a_missing_checkpoint_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join("bench", "whole_val.py"), str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
