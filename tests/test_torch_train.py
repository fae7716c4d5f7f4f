"""bench/torch_train.py, the PyTorch side of the scaled rung's curve: a run stopped by SIGTERM
checkpoints after the step under way and, resumed, ends exactly where an uninterrupted run ends.

Skipped when torch is not installed, except under CI (tests/required.py), which installs it.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
from required import may_not_skip

if may_not_skip():
    import torch  # noqa: F401  (CI installs the bench extra: a missing torch is an error there)
else:
    pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "torch_train.py")
# a small dropout model (dropout draws from torch's generator, which the checkpoint must carry)
# with a decaying learning rate, long enough that a SIGTERM lands mid-run
FLAGS = ["--preset=residual", "--n_layer=1", "--n_embd=16", "--block_size=8", "--batch_size=4",
         "--dropout=0.1", "--decay_lr=true", "--warmup_iters=5", "--max_iters=1000",
         "--eval_interval=500", "--eval_iters=2"]


def run(text_file, out_dir, *extra, **popen):
    cmd = [sys.executable, SCRIPT, f"--data={text_file}", f"--out_dir={out_dir}", *FLAGS, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, **popen)


def rows(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sigterm_checkpoints_and_resume_matches(tmp_path, text_file):
    whole = run(text_file, tmp_path / "whole")
    out, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err

    cut = run(text_file, tmp_path / "cut")
    for line in cut.stdout:  # the run has started its steps once step 0 is evaluated
        if line.startswith("step 0:"):
            break
    cut.send_signal(signal.SIGTERM)
    out, err = cut.communicate(timeout=600)
    assert cut.returncode == 0, err
    assert "stopped at step" in out, out  # the run was cut before its end
    stopped = int(out.split("stopped at step ")[1].split(";")[0])
    assert 0 <= stopped < 1000

    resumed = run(text_file, tmp_path / "cut", "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resuming from step {stopped}" in out
    a, b = rows(tmp_path / "whole"), rows(tmp_path / "cut")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 500, 1000]
    for ra, rb in zip(a, b):
        assert (ra["train_loss"], ra["val_loss"]) == (rb["train_loss"], rb["val_loss"])
