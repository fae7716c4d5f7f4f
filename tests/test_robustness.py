"""Careless and hostile input, and faults: a full disk, an unwritable out_dir, broken and forged
checkpoints, absurd sizes, devices as data, numerical extremes. Each must end in one line on
stderr, a non-zero exit and nothing lost (see also test_journey.py for kill -9, Ctrl-C, locks)."""
import errno
import json
import os
import resource
import subprocess
import sys

import numpy as np
import pytest
from cli_tools import one_line_error

import numgpt
from numgpt.checkpoint import (CheckpointError, load_checkpoint, read_model_checkpoint,
                               save_checkpoint)
from numgpt.config import ConfigError, get_config
from numgpt.data import DataError, Dataset, load_dataset
from numgpt.layers import layernorm_backward, layernorm_forward
from numgpt.resources import check_memory, num_params, training_bytes
from numgpt.trainer import TrainingError, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_embd=16", "--n_head=2", "--n_layer=1", "--block_size=16", "--batch_size=4",
        "--eval_iters=2", "--warmup_iters=2"]


def run(python, repo, script, *args, fsize=None, env_extra=None):
    env = dict(os.environ, PYTHONPATH=repo, **(env_extra or {}))

    def limit():  # RLIMIT_FSIZE: writes past this size fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return subprocess.run([python, os.path.join(repo, script), *args], capture_output=True,
                          text=True, timeout=300, cwd=repo, env=env,
                          preexec_fn=limit if fsize is not None else None)


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """A run trained for 4 steps by train.py on the text_file corpus, once for this module."""
    from conftest import write_corpus
    root = tmp_path_factory.mktemp("trained")
    text = write_corpus(root)  # the text_file fixture's corpus
    out = str(root / "run")
    r = run(sys.executable, REPO, "train.py", f"--data={text}", f"--out_dir={out}",
            "--max_iters=4", "--eval_interval=2", *TINY,
            env_extra={"NUMGPT_DATA_DIR": str(root / "data-cache")})
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def trained(trained_once, tmp_path):
    """A run trained for 4 steps by train.py, a copy of its own for each test: (out_dir,
    checkpoint bytes)."""
    import shutil
    out = str(tmp_path / "run")
    shutil.copytree(trained_once, out, symlinks=True)
    with open(os.path.join(out, "ckpt.npz"), "rb") as f:
        return out, f.read()


def ckpt_bytes(out):
    with open(os.path.join(out, "ckpt.npz"), "rb") as f:
        return f.read()


# ---- the disk ----

def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(python, repo, text_file,
                                                                     trained):
    out, before = trained
    # resume under a file-size limit smaller than a checkpoint: the first save fails mid-write
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={out}", "--resume",
            "--max_iters=8", *TINY, fsize=len(before) // 2)
    one_line_error(r, "could not write the checkpoint")
    assert "previous checkpoint is intact" in r.stderr
    assert ckpt_bytes(out) == before
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    load_checkpoint(os.path.join(out, "ckpt.npz"))


def test_no_space_left_is_reported_and_the_checkpoint_kept(text_file, tmp_path, monkeypatch):
    cfg = get_config("laptop", n_embd=16, n_head=2, n_layer=1, block_size=16, batch_size=4,
                     eval_iters=2, max_iters=4, eval_interval=2)
    ds = load_dataset(text_file)
    out = str(tmp_path / "o")
    train(cfg, ds, out, quiet=True, sample_chars=0)
    before = ckpt_bytes(out)
    import numgpt.data as d
    real_fsync = os.fsync

    def no_space(fd):  # the disk fills up while the checkpoint (and only it) is written
        if "ckpt.npz" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    monkeypatch.setattr(d.os, "fsync", no_space)
    with pytest.raises(TrainingError, match="No space left on device.*previous checkpoint"):
        train(cfg.replace(max_iters=8), ds, out, resume=True, quiet=True, sample_chars=0)
    monkeypatch.setattr(d.os, "fsync", real_fsync)
    assert ckpt_bytes(out) == before
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_out_dir_that_cannot_be_written(python, repo, text_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine", encoding="utf-8")
    for out in (blocker, blocker / "sub", "/proc/numgpt-out"):
        r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={out}",
                "--max_iters=2", *TINY)
        one_line_error(r, "cannot write to out_dir")
    assert blocker.read_text(encoding="utf-8") == "mine"
    if os.geteuid() != 0:  # root writes through permissions
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o500)
        r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={ro}",
                "--max_iters=2", *TINY)
        one_line_error(r, "cannot write to out_dir")


def test_a_new_run_never_overwrites_files_in_out_dir(python, repo, text_file, tmp_path):
    for name in ("log.jsonl", "loss.png"):
        out = tmp_path / name.replace(".", "-")
        out.mkdir()
        (out / name).write_text("the user's own file", encoding="utf-8")
        r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={out}",
                "--max_iters=2", *TINY)
        one_line_error(r, "already holds " + name)
        assert (out / name).read_text(encoding="utf-8") == "the user's own file"
        assert not (out / "ckpt.npz").exists()


def signal_a_training_run(python, repo, text_file, out, *signals):
    """Start train.py, wait until it is past its first evaluation, send the signals one right after
    the other, and assert that it saved a checkpoint and exited 0, as after one Ctrl-C."""
    import time

    from numgpt.trainer import read_log
    env = dict(os.environ, PYTHONPATH=repo)
    p = subprocess.Popen([python, os.path.join(repo, "train.py"), f"--data={text_file}",
                          f"--out_dir={out}", "--max_iters=100000", "--eval_interval=1000", *TINY],
                         cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not read_log(os.path.join(out, "log.jsonl")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    for sig in signals:
        p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert "continue with --resume" in stdout
    assert load_checkpoint(os.path.join(out, "ckpt.npz"))[2]["step"] > 0


def test_sigterm_saves_like_ctrl_c(python, repo, text_file, tmp_path):
    import signal
    signal_a_training_run(python, repo, text_file, str(tmp_path / "t"), signal.SIGTERM)


def test_sample_into_a_closed_pipe_is_quiet(python, repo, trained):
    out, _ = trained
    env = dict(os.environ, PYTHONPATH=repo)
    p = subprocess.Popen([python, os.path.join(repo, "sample.py"), f"--out_dir={out}",
                          "--max_new_tokens=100000"], cwd=repo, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.read(10)
    p.stdout.close()  # like `python sample.py | head -c 10`
    stderr = p.stderr.read().decode()
    p.wait(timeout=120)
    assert "Traceback" not in stderr and "error" not in stderr, stderr


def test_unwritable_data_cache_is_one_line(python, repo, text_file, tmp_path):
    blocker = tmp_path / "cache-file"
    blocker.write_text("x", encoding="utf-8")
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={tmp_path / 'o'}",
            "--max_iters=2", *TINY, env_extra={"NUMGPT_DATA_DIR": str(blocker / "data")})
    one_line_error(r, "NUMGPT_DATA_DIR")


# ---- data that is not a text file ----

@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_data_that_is_a_device_or_a_pipe(python, repo, tmp_path, kind):
    if kind == "device":
        path = "/dev/zero"  # reading it would never end
    else:
        path = str(tmp_path / "fifo")
        os.mkfifo(path)  # reading it would block forever
    r = run(python, repo, "train.py", f"--data={path}", f"--out_dir={tmp_path / 'o'}", *TINY)
    one_line_error(r, "regular text file")


def test_tampered_prepared_data_is_refused(text_file):
    ds = load_dataset(text_file)
    ids = np.fromfile(os.path.join(ds.folder, "train.bin"), dtype=np.uint16)
    ids[5] = 60000  # an id past the end of the vocabulary
    ids.tofile(os.path.join(ds.folder, "train.bin"))
    with pytest.raises(DataError, match="outside the vocabulary.*delete the folder"):
        Dataset(ds.folder)
    meta = json.load(open(os.path.join(ds.folder, "vocab.json"), encoding="utf-8"))
    meta["chars"] = ["ab", "c"]
    with open(os.path.join(ds.folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f)
    with pytest.raises(DataError, match="distinct characters"):
        Dataset(ds.folder)


# ---- sizes and numbers on the command line ----

@pytest.mark.parametrize("args,match", [
    (["--max_iters=1.5"], "max_iters must be a whole number"),
    (["--batch_size=2.5"], "batch_size must be a whole number"),
    (["--n_layer=-1"], "n_layer must be at least 1"),
    (["--block_size=0"], "block_size must be at least 1"),
    (["--eval_iters=nan"], "eval_iters must be a whole number"),
    (["--seed=-1"], "seed"),
    (["--learning_rate=inf"], "learning_rate"),
    (["--learning_rate=nan"], "learning_rate"),
    (["--dropout=-0.1"], "dropout"),
    (["--grad_clip=inf"], "grad_clip"),
    (["--batch_size=100000000"], "memory"),
    (["--n_embd=1000000", "--n_head=1"], "memory"),
    (["--kernels=maybe"], "true or false"),
    (["--max_iters"], "needs a value"),
    (["stray"], "unexpected argument"),
])
def test_train_refuses_impossible_numbers(python, repo, text_file, tmp_path, args, match):
    keys = {a.split("=")[0] for a in args}
    tiny = [a for a in TINY if a.split("=")[0] not in keys]
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={tmp_path / 'o'}",
            *tiny, *args)
    one_line_error(r, match)
    assert not os.path.exists(tmp_path / "o" / "ckpt.npz")


def test_whole_numbers_may_be_written_in_exponent_form():
    """One rule for train.py and sample.py (config.parse_whole_number): 1e3 and 20.0 are whole."""
    assert get_config("bigram", max_iters="1000").max_iters == 1000
    assert get_config("bigram", max_iters="1e3").max_iters == 1000
    assert get_config("bigram", max_iters="20.0").max_iters == 20
    for text in ("1e-3", "20.5", "1e400"):
        with pytest.raises(ConfigError, match="whole number such as 1000"):
            get_config("bigram", max_iters=text)


def test_memory_estimate_is_checked_before_allocating():
    cfg = get_config("scaled", vocab_size=65)
    assert num_params(cfg) == numgpt.GPT(cfg.replace(n_layer=1)).num_params() + 5 * (
        num_params(cfg.replace(n_layer=2)) - num_params(cfg.replace(n_layer=1)))
    huge = cfg.replace(n_layer=10 ** 9)  # counted without listing a billion blocks
    assert num_params(huge) > 10 ** 15
    check_memory(cfg, available=training_bytes(cfg))
    with pytest.raises(ConfigError, match="lower --batch_size"):
        check_memory(cfg, available=training_bytes(cfg) - 1)


# ---- forged and broken checkpoints, through sample.py ----

def forge(src, dst, change):
    params, opt, meta = load_checkpoint(src)
    change(params, meta)
    os.makedirs(dst, exist_ok=True)
    save_checkpoint(os.path.join(dst, "ckpt.npz"), params, opt, meta)
    return dst


def first(params):
    return sorted(params)[0]


FORGERIES = {
    "nan weights": (lambda p, m: p[first(p)].reshape(-1).__setitem__(0, np.nan), "NaN or infinite"),
    "int weights": (lambda p, m: p.__setitem__(first(p), p[first(p)].astype(np.int32)), "dtype"),
    "wrong shape": (lambda p, m: p.__setitem__(first(p), p[first(p)][:1]), "parameter"),
    "missing weight": (lambda p, m: p.pop(first(p)), "parameter"),
    "extra weight": (lambda p, m: p.__setitem__("zzz", np.zeros(3, np.float32)), "parameter"),
    "duplicate chars": (lambda p, m: m.__setitem__("vocab", ["a"] * len(m["vocab"])),
                        "broken vocabulary"),
    "vocab as a string": (lambda p, m: m.__setitem__("vocab", "abc"), "broken vocabulary"),
    "multi-char token": (lambda p, m: m["vocab"].__setitem__(0, "ab"), "broken vocabulary"),
    "billion layers": (lambda p, m: m["config"].__setitem__("n_layer", 10 ** 9), "parameter"),
    "bad config value": (lambda p, m: m["config"].__setitem__("n_embd", "x"), "invalid config"),
    "unknown config key": (lambda p, m: m["config"].__setitem__("evil", 1), "invalid config"),
    "no config": (lambda p, m: m.pop("config"), "no config"),
    "bad step": (lambda p, m: m.__setitem__("step", "x"), "step"),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_sample_refuses_forged_checkpoints(python, repo, trained, tmp_path, name):
    out, _ = trained
    change, match = FORGERIES[name]
    bad = forge(os.path.join(out, "ckpt.npz"), str(tmp_path / "forged"), change)
    with pytest.raises(CheckpointError, match=match):
        read_model_checkpoint(os.path.join(bad, "ckpt.npz"))
    if name in ("nan weights", "billion layers", "duplicate chars"):  # and the CLI says so
        one_line_error(run(python, repo, "sample.py", f"--out_dir={bad}"), match)


@pytest.mark.parametrize("content,match", [
    (b"", "is empty"),
    (b"garbage, not a checkpoint", "not an .npz archive"),
    (b"\x80\x04\x95 a pickle", "is a pickle"),
    (b"\x93NUMPY a bare array", "not an .npz archive"),
])
def test_sample_refuses_files_that_are_not_checkpoints(python, repo, tmp_path, content, match):
    d = tmp_path / "o"
    d.mkdir()
    (d / "ckpt.npz").write_bytes(content)
    one_line_error(run(python, repo, "sample.py", f"--out_dir={d}"), match)
    assert (d / "ckpt.npz").read_bytes() == content


def test_sample_refuses_a_truncated_checkpoint(python, repo, trained, tmp_path):
    out, good = trained
    for cut in (len(good) // 2, len(good) - 10):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / "ckpt.npz").write_bytes(good[:cut])
        one_line_error(run(python, repo, "sample.py", f"--out_dir={d}"), "truncated or corrupted")


def test_sample_refuses_a_corrupted_checkpoint(python, repo, trained, tmp_path):
    out, good = trained
    bad = bytearray(good)
    mid = len(bad) // 2
    bad[mid:mid + 64] = bytes(64)  # zeroed bytes inside a stored array: the zip CRC catches it
    d = tmp_path / "bad"
    d.mkdir()
    (d / "ckpt.npz").write_bytes(bytes(bad))
    one_line_error(run(python, repo, "sample.py", f"--out_dir={d}"), "ckpt.npz")


@pytest.mark.parametrize("args,match", [
    (["--start=FILE:/dev/null/x"], "cannot read the prompt file"),
    (["--max_new_tokens=-1"], "max_new_tokens"),
    (["--num_samples=1.5"], "num_samples"),
    (["--temperature=-1"], "temperature"),
    (["--top_k=-3"], "top_k"),
    (["--top_p=1.5"], "top_p"),
    (["--seed=x"], "seed"),
    (["--beam=3"], "unknown option"),
])
def test_sample_refuses_bad_options(python, repo, trained, args, match):
    out, _ = trained
    one_line_error(run(python, repo, "sample.py", f"--out_dir={out}", *args), match)


def test_prompt_file_that_is_not_utf8(python, repo, trained, tmp_path):
    out, _ = trained
    p = tmp_path / "prompt.bin"
    p.write_bytes(b"\xff\xfe\x00bad")
    one_line_error(run(python, repo, "sample.py", f"--out_dir={out}", f"--start=FILE:{p}"),
                   "cannot read the prompt file")


def test_extreme_temperatures_still_sample(python, repo, trained):
    out, _ = trained
    for t in ("0", "1e-30", "1e30"):
        r = run(python, repo, "sample.py", f"--out_dir={out}", f"--temperature={t}",
                "--max_new_tokens=20", "--start=to")
        assert r.returncode == 0 and r.stdout.startswith("to") and len(r.stdout) >= 22, r.stderr


# ---- numerical faults through train.py ----

def test_nan_loss_through_the_command_line_keeps_the_checkpoint(python, repo, text_file, trained,
                                                                tmp_path):
    out, _ = trained
    # weights at 1e30 are finite, so the checkpoint loads, but the logits overflow to inf and the
    # loss becomes NaN on the first step after resuming
    blown = forge(os.path.join(out, "ckpt.npz"), str(tmp_path / "blown"),
                  lambda p, m: [p.__setitem__(k, (p[k] * 0 + 1e30).astype(np.float32))
                                for k in p if k.endswith("w") or "w_" in k])
    before = ckpt_bytes(blown)
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={blown}", "--resume",
            "--max_iters=8", *TINY)
    one_line_error(r, "at step 4")
    assert "last good checkpoint" in r.stderr
    assert ckpt_bytes(blown) == before


def test_divergence_in_process_names_the_step(text_file, tmp_path):
    cfg = get_config("laptop", n_embd=16, n_head=2, n_layer=1, block_size=16, batch_size=4,
                     eval_iters=2, max_iters=50, eval_interval=5, learning_rate=9.9,
                     warmup_iters=0, grad_clip=0.0, decay_lr=False)
    ds = load_dataset(text_file)
    out = str(tmp_path / "o")
    import numgpt.trainer as tr
    real = tr.clip_grad_norm
    calls = {"n": 0}

    def poison(grads, clip):  # a gradient turns infinite at the 8th step (index 7)
        calls["n"] += 1
        if calls["n"] == 8:
            next(iter(grads.values()))[...] = np.inf
        return real(grads, clip)
    import unittest.mock
    with unittest.mock.patch.object(tr, "clip_grad_norm", poison):
        with pytest.raises(TrainingError, match="at step 7"):
            train(cfg, ds, out, quiet=True, sample_chars=0)
    _, _, meta = load_checkpoint(os.path.join(out, "ckpt.npz"))
    assert meta["step"] == 5


# ---- LayerNorm at tiny and huge variance ----

@pytest.mark.parametrize("use_kernels", [False, True])
@pytest.mark.parametrize("case", ["constant", "tiny variance", "large offset", "huge values"])
def test_layernorm_is_stable_at_extreme_variance(use_kernels, case):
    rng = np.random.default_rng(0)
    C = 48
    base = rng.standard_normal((6, C))
    x = {"constant": np.full((6, C), 3.0),
         "tiny variance": 1.0 + 1e-6 * base,
         "large offset": 1e4 + base,
         "huge values": 1e15 * base}[case].astype(np.float32)
    g = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
    b = (0.1 * rng.standard_normal(C)).astype(np.float32)
    dy = rng.standard_normal((6, C)).astype(np.float32)
    if use_kernels:
        ops = numgpt.ops.get_ops(True)
        y, cache = ops.layernorm_forward(x, g, b)
        dx, dg, db = ops.layernorm_backward(dy, cache)
    else:
        y, cache = layernorm_forward(x, g, b)
        dx, dg, db = layernorm_backward(dy, cache)
    y64, c64 = layernorm_forward(x.astype(np.float64), g.astype(np.float64), b.astype(np.float64))
    dx64, dg64, db64 = layernorm_backward(dy.astype(np.float64), c64)
    for got, want in ((y, y64), (dx, dx64), (dg, dg64), (db, db64)):
        assert np.isfinite(got).all()
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(got - want).max() <= 2e-3 * scale, case
    if case == "constant":  # zero variance: the output is the bias, the input gradient is finite
        np.testing.assert_allclose(y, np.broadcast_to(b, y.shape), atol=1e-6)


def test_training_never_writes_non_finite_parameters(text_file, tmp_path):
    cfg = get_config("laptop", n_embd=16, n_head=2, n_layer=1, block_size=16, batch_size=4,
                     eval_iters=2, max_iters=6, eval_interval=3)
    ds = load_dataset(text_file)
    out = str(tmp_path / "o")
    import unittest.mock

    import numgpt.trainer as tr
    from numgpt import optim

    class Poisoned(optim.AdamW):  # weights turn to NaN inside the optimizer
        def step(self, grads, lr):
            super().step(grads, lr)
            next(iter(self.params.values()))[...] = np.nan
    # stopped (as by Ctrl-C) right after the poisoned step: the save must refuse the NaN weights
    with unittest.mock.patch.object(tr, "make_optimizer", lambda m, c: Poisoned(m.params)):
        with pytest.raises(TrainingError, match="not finite at step 1"):
            train(cfg, ds, out, quiet=True, sample_chars=0, stop_at=1)
    params, _, meta = load_checkpoint(os.path.join(out, "ckpt.npz"))
    assert meta["step"] == 0
    assert all(np.isfinite(v).all() for v in params.values())


# ---- the Python API: ids index tables inside the kernels, so they are checked at the door ----

@pytest.mark.parametrize("kernels", [False, True])
def test_api_refuses_token_ids_it_cannot_index(kernels):
    from numgpt.generate import generate
    model = numgpt.GPT(get_config("multi_head", vocab_size=10, kernels=kernels))
    ok = np.full((2, 8), 3)
    bad = [(np.full((2, 8), 10), ok, "token id 10, outside the vocabulary"),
           (np.full((2, 8), -1), ok, "token id -1"),
           (ok, np.full((2, 8), 10 ** 6), "targets holds token id 1000000"),
           (ok.astype(float), ok, "integer token ids"),
           (ok[0], ok[0], r"\[B, T\]"),
           (ok, ok[:, :4], "targets have shape"),
           (np.zeros((2, 9), int), np.zeros((2, 9), int), "exceeds block_size")]
    for x, y, match in bad:
        with pytest.raises(ValueError, match=match):
            model.loss_and_grads(x, y)
        with pytest.raises(ValueError, match=match):
            model.loss(x, y)
    for prompt, kw, match in [(np.array([[10]]), {}, "outside the vocabulary"),
                              (np.array([[-2]]), {}, "outside the vocabulary"),
                              (np.zeros((1, 0), int), {}, "at least one token"),
                              (np.array([[1]]), {"temperature": float("nan")}, "temperature"),
                              (np.array([[1]]), {"top_k": -1}, "top_k"),
                              (np.array([[1]]), {"top_p": 2.0}, "top_p")]:
        with pytest.raises(ValueError, match=match):
            generate(model, prompt, 3, **kw)
    assert generate(model, np.ones((1, 30), int), 3).shape == (1, 33)  # a long prompt is cropped


def test_memory_check_can_be_skipped_by_experts(monkeypatch):
    cfg = get_config("scaled", vocab_size=65)
    monkeypatch.setenv("NUMGPT_NO_MEMORY_CHECK", "1")
    check_memory(cfg, available=1)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# ---- found by a hostile-user review ----

def test_ladder_run_again_continues_and_keeps_what_it_does_not_continue(text_file, tmp_path,
                                                                        capsys):
    from numgpt import ladder
    args = ["--stages=bigram", "--iters-scale=0.002", f"--data={text_file}",
            f"--out-dir={tmp_path / 'lad'}"]
    assert ladder.main(args) == 0
    first = ckpt_bytes(tmp_path / "lad" / "bigram-seed1337")
    capsys.readouterr()
    assert ladder.main(args) == 0  # a re-run finds the rung trained: not trained again
    out = capsys.readouterr().out
    assert "bigram 0s (trained before)" in out and "trained before, in " in out
    assert ckpt_bytes(tmp_path / "lad" / "bigram-seed1337") == first
    assert ladder.main(args + ["--fresh"]) == 0  # --fresh: trained anew ...
    kept = tmp_path / "lad" / "bigram-seed1337.previous"
    assert ckpt_bytes(kept) == first  # ... and the first run is kept whole
    assert (kept / "log.jsonl").exists() and "--fresh" in capsys.readouterr().out
    assert ladder.main(args[:1] + ["--iters-scale=0.003"] + args[2:]) == 0  # another length
    assert "trained with another config" in capsys.readouterr().out
    assert (tmp_path / "lad" / "bigram-seed1337.previous-2" / "ckpt.npz").exists()
    other = tmp_path / "other.txt"  # the same characters in another text
    other.write_text("".join(reversed(open(text_file, encoding="utf-8").read())), encoding="utf-8")
    assert ladder.main(args[:1] + ["--iters-scale=0.003", f"--data={other}"] + args[3:]) == 0
    assert "trained on other data" in capsys.readouterr().out


def test_interrupted_ladder_stops_and_reports_no_losses(text_file, tmp_path, capsys, monkeypatch):
    from numgpt import ladder
    real = ladder.train
    monkeypatch.setattr(ladder, "train", lambda *a, **k: real(*a, **k, stop_at=3))  # as Ctrl-C
    rc = ladder.main(["--stages=bigram,single_head", "--iters-scale=0.01", f"--data={text_file}",
                      f"--out-dir={tmp_path / 'lad'}"])
    out = capsys.readouterr().out
    assert rc == 0 and "interrupted: bigram stopped at step 3" in out
    assert "the same command continues it" in out
    assert "single_head" not in out.split("interrupted")[1] and "published" not in out


def test_an_interrupted_rung_resumes_when_the_ladder_runs_again(text_file, tmp_path, capsys,
                                                                  monkeypatch):
    from numgpt import ladder
    args = ["--stages=bigram,single_head", "--iters-scale=0.01", f"--data={text_file}"]
    assert ladder.main(args + [f"--out-dir={tmp_path / 'whole'}"]) == 0
    whole = capsys.readouterr().out
    real = ladder.train
    # bigram stops at step 4 (as after Ctrl-C or a kill); run again, it resumes and finishes,
    # and single_head stops at 7; run again, single_head resumes and finishes
    stops = iter([4, None, 7, None])
    monkeypatch.setattr(ladder, "train", lambda *a, **k: real(*a, **k, stop_at=next(stops)))
    part = str(tmp_path / "part")
    assert ladder.main(args + [f"--out-dir={part}"]) == 0
    assert ladder.main(args + [f"--out-dir={part}"]) == 0
    out = capsys.readouterr().out
    assert "(resumes at step 4 of 30)" in out and "resumed at step 4" in out
    assert "interrupted: single_head stopped at step 7" in out
    assert ladder.main(args + [f"--out-dir={part}"]) == 0
    out = capsys.readouterr().out
    assert "(trained before)" in out and "(resumes at step 7 of 50)" in out
    assert not os.path.exists(os.path.join(part, "bigram-seed1337.previous"))

    def table(text):
        return [ln for ln in text.splitlines() if ln.startswith(("bigram ", "single_head "))]
    assert table(out) == table(whole)  # the same losses as the uninterrupted ladder
    for rung in ("bigram-seed1337", "single_head-seed1337"):
        assert ckpt_bytes(tmp_path / "whole" / rung) == ckpt_bytes(tmp_path / "part" / rung)


def test_ladder_says_how_long_it_will_take_before_it_trains(text_file, tmp_path, capsys,
                                                            monkeypatch):
    from numgpt import budget, ladder
    seen = []
    monkeypatch.setattr(ladder, "measure_rung", lambda cfg, ds: (
        seen.append(cfg.max_iters) or budget.Costs(step=0.5, eval_batch=0.01, save=0.2)))
    real = ladder.train

    before = []

    def train(*a, **k):
        before.append(before or capsys.readouterr().out)  # what was said before the first rung
        return real(*a, **k)
    monkeypatch.setattr(ladder, "train", train)
    assert ladder.main(["--stages=bigram,single_head", "--iters-scale=0.002", "--seeds=2",
                        f"--data={text_file}", f"--out-dir={tmp_path / 'lad'}"]) == 0
    assert "expected time on this machine: bigram " in before[0] and "; total " in before[0]
    assert seen == [6, 10]  # each rung measured once, whatever the seeds
    # bigram, per seed: 6 steps at 0.5 s, evaluations at 0 (2 x 10 batches) and 1..6 (2 x 200)
    # each with a checkpoint: 3 + 0.4 + 6 * 4.2 = 28.6 s; twice: 57.2 s
    assert ladder._estimate(
        {"bigram": [ladder.Run("bigram", numgpt.get_config("bigram", max_iters=6, eval_interval=1),
                               str(tmp_path / "none"))] * 2}, None) == {"bigram": [
                                   pytest.approx(28.6), pytest.approx(28.6)]}
    assert "bigram 57.2s at 500 ms a step" in capsys.readouterr().out


def test_data_file_with_an_undecodable_name(python, repo, text_file, tmp_path):
    odd = os.path.join(os.fsencode(tmp_path), b"sm\xffall.txt")
    with open(odd, "wb") as f, open(text_file, "rb") as g:
        f.write(g.read())
    r = subprocess.run([python, os.path.join(repo, "train.py"), b"--data=" + odd,
                        f"--out_dir={tmp_path / 'o'}", "--max_iters=2", *TINY], capture_output=True,
                       cwd=repo, env=dict(os.environ, PYTHONPATH=repo), timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")


def test_prompt_file_that_never_ends(python, repo, trained, tmp_path):
    out, _ = trained
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        one_line_error(run(python, repo, "sample.py", f"--out_dir={out}", f"--start=FILE:{path}"),
                       "not a regular file")


def test_tiny_temperature_is_greedy_not_nan():
    from numgpt.generate import next_token_probs
    logits = np.array([[1.0, 3.0, 2.0, 3.0 - 1e-9]])
    for t in (1e-320, 1e-300, 1e-30):
        p = next_token_probs(logits, temperature=t)
        assert np.isfinite(p).all() and p[0, 1] == 1.0, t
    with np.errstate(all="raise"):  # and no warnings on the way
        next_token_probs(logits, temperature=1e-320)


def test_resume_switch_takes_false(python, repo, text_file, trained):
    out, before = trained
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={out}", "--resume=false",
            "--max_iters=8", *TINY)
    one_line_error(r, "already holds a checkpoint")
    assert ckpt_bytes(out) == before
    one_line_error(run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={out}",
                       "--resume=perhaps", *TINY), "is a switch")


def test_output_the_terminal_cannot_encode(python, repo, trained):
    out, _ = trained  # the corpus holds 'é'
    r = run(python, repo, "sample.py", f"--out_dir={out}", "--start=é", "--max_new_tokens=200",
            env_extra={"PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.startswith("\\xe9")


def test_users_dot_files_in_out_dir_are_left_alone(python, repo, text_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / ".lock").write_text("precious", encoding="utf-8")
    (out / ".write-test").write_text("mine", encoding="utf-8")
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={out}", "--max_iters=2",
            *TINY)
    assert r.returncode == 0, r.stderr
    assert (out / ".lock").read_text(encoding="utf-8") == "precious"
    assert (out / ".write-test").read_text(encoding="utf-8") == "mine"


@pytest.mark.parametrize("field,value", [("opt.t", -1), ("opt.t", 10 ** 15), ("opt.t", 2.5),
                                         ("rng", -1), ("rng", 10 ** 50), ("opt.m", 1j)])
def test_resume_refuses_a_broken_optimizer_or_generator_state(python, repo, text_file, trained,
                                                              tmp_path, field, value):
    out, _ = trained
    params, opt, meta = load_checkpoint(os.path.join(out, "ckpt.npz"))
    if field == "opt.t":
        opt["t"] = np.array(value)
    elif field == "opt.m":
        k = next(k for k in opt if k.startswith("m."))
        opt[k] = opt[k] + value
    else:
        meta["rng_state"]["state"]["state"] = value
    bad = tmp_path / "bad"
    bad.mkdir()
    save_checkpoint(str(bad / "ckpt.npz"), params, opt, meta)
    before = ckpt_bytes(bad)
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={bad}", "--resume",
            "--max_iters=8", *TINY)
    one_line_error(r, "broken optimizer or random-generator state")
    assert ckpt_bytes(bad) == before


def test_a_damaged_log_line_loses_only_itself(python, repo, text_file, trained):
    out, _ = trained
    log = os.path.join(out, "log.jsonl")
    lines = open(log, encoding="utf-8").read().splitlines()
    assert len(lines) == 3
    lines[0] = "garbage"
    with open(log, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={out}", "--resume",
            "--max_iters=6", "--eval_interval=2", *TINY)
    assert r.returncode == 0, r.stderr
    from numgpt.trainer import read_log
    assert [row["step"] for row in read_log(log)] == [2, 4, 6]


def test_checkpoint_claiming_more_memory_than_there_is(trained, monkeypatch):
    out, _ = trained
    import numgpt.resources as res
    monkeypatch.setattr(res, "available_bytes", lambda: 1000)
    with pytest.raises(CheckpointError, match="unpacks to"):
        load_checkpoint(os.path.join(out, "ckpt.npz"))


def test_sample_default_prompt_without_a_newline_in_the_vocabulary(python, repo, tmp_path):
    data = tmp_path / "abc.txt"
    data.write_text("abcab" * 400, encoding="utf-8")
    out = tmp_path / "o"
    r = run(python, repo, "train.py", f"--data={data}", f"--out_dir={out}", "--max_iters=2", *TINY)
    assert r.returncode == 0, r.stderr
    r = run(python, repo, "sample.py", f"--out_dir={out}", "--max_new_tokens=10")
    assert r.returncode == 0 and len(r.stdout.strip()) == 11, r.stderr


def test_api_misuse():
    from numgpt.generate import generate
    with pytest.raises(ValueError, match="float32 or float64"):
        numgpt.GPT(get_config("bigram"), dtype=np.int32)
    m = numgpt.GPT(get_config("multi_head", vocab_size=10))
    with pytest.raises(ValueError, match="top_k"):
        generate(m, np.array([[1]]), 2, top_k=True)
    cfg = get_config("preln", learning_rate=np.float32(3e-4), n_layer=np.int64(2))
    assert cfg.n_layer == 2 and isinstance(cfg.n_layer, int)
    with pytest.raises(ConfigError, match="vocab_size is set by the data"):
        from numgpt.cli import train_main
        train_main(["--vocab_size=3"])


def test_load_dataset_takes_a_bytes_path(text_file):
    assert len(load_dataset(os.fsencode(text_file)).vocab) > 10


def test_sigterm_while_sampling_is_one_line(python, repo, trained):
    import signal
    import time
    out, _ = trained
    env = dict(os.environ, PYTHONPATH=repo)
    p = subprocess.Popen([python, os.path.join(repo, "sample.py"), f"--out_dir={out}",
                          "--max_new_tokens=10000000"], cwd=repo, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.read(50)  # sampling has begun
    p.send_signal(signal.SIGTERM)
    t0 = time.time()
    stdout, stderr = p.communicate(timeout=60)
    assert time.time() - t0 < 30
    assert p.returncode == 130 and stderr.strip().startswith("interrupted"), stderr
    assert len(stderr.strip().splitlines()) == 1


def test_ctrl_c_delivered_twice_at_once_still_saves(python, repo, text_file, tmp_path):
    """`timeout` and other wrappers forward the terminal's SIGINT to the child, which then gets it
    twice within microseconds: that is one Ctrl-C (save and exit 0), not two (give up)."""
    import signal
    signal_a_training_run(python, repo, text_file, str(tmp_path / "t"), signal.SIGINT,
                          signal.SIGINT)


def test_memory_estimates_count_attention_scores():
    """Sampling runs the prompt through the model, whose attention builds T x T scores per head;
    the NumPy training path keeps them per layer (three copies with dropout). A block-4096 model
    with 16 heads peaked at 3.46 GB sampling a long prompt, while its weights are a few MB. The
    kernels keep none per layer at this size, only a chunk's while a layer computes (here one
    sequence's 16 x 1024 x 1024, three buffers, in each of the sharded step's two threads)."""
    from numgpt.resources import sampling_bytes
    big = get_config("laptop", block_size=4096, n_layer=1, n_embd=64, n_head=16, vocab_size=65)
    assert sampling_bytes(big) > 3.2e9
    ref = get_config("laptop", kernels=False, block_size=1024, n_layer=2, n_embd=64, n_head=16,
                     batch_size=4, dropout=0.1, vocab_size=65)
    assert training_bytes(ref) > 2.5e9  # measured peak 2.57 GB
    assert training_bytes(ref.replace(kernels=True)) < training_bytes(ref) / 3


def test_sample_interrupted_twice_at_once_is_one_line(python, repo, trained):
    import signal
    out, _ = trained
    env = dict(os.environ, PYTHONPATH=repo)
    for _ in range(3):
        p = subprocess.Popen([python, os.path.join(repo, "sample.py"), f"--out_dir={out}",
                              "--max_new_tokens=10000000"], cwd=repo, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        p.stdout.read(50)
        p.send_signal(signal.SIGINT)
        p.send_signal(signal.SIGINT)
        _, stderr = p.communicate(timeout=60)
        assert p.returncode == 130 and "Traceback" not in stderr, stderr
        assert stderr.strip().startswith("interrupted") and len(stderr.strip().splitlines()) == 1


def test_sighup_saves_like_ctrl_c(python, repo, text_file, tmp_path):
    import signal
    signal_a_training_run(python, repo, text_file, str(tmp_path / "t"), signal.SIGHUP)


def test_kernel_memory_estimate_counts_kept_probabilities_per_shard(monkeypatch):
    """The kernels keep a layer's T x T probabilities while they fit kernels/ops.STORE_PROBS_BYTES,
    judged on the batch one call sees: half of it in data-parallel steps. The scaled model with
    12 heads at batch 16 is sharded, and each half keeps them (the whole batch would not)."""
    import numgpt.kernels.ops
    from numgpt import parallel
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    cfg = get_config("scaled", batch_size=16, n_head=12, vocab_size=65)
    assert "sharded" in parallel.candidates(cfg)
    assert not numgpt.kernels.ops.stores_probs(16, 12, 256, "float32")
    assert numgpt.kernels.ops.stores_probs(8, 12, 256, "float32")
    stored = training_bytes(cfg, "sharded")
    again = training_bytes(cfg, "plain")  # the whole batch: computed again, a chunk at a time
    assert training_bytes(cfg) == max(training_bytes(cfg, s) for s in parallel.candidates(cfg))
    N, L, H, T = 16 * 256, 6, 12, 256
    chunk = 3 * numgpt.kernels.ops.CHUNK_BYTES  # a chunk's probabilities, dropped and gradient
    assert stored - again == pytest.approx(4 * N * H * T * (L * 1.25 + 3 - L * 0.25) - chunk,
                                           rel=1e-6)


def test_kernel_memory_estimate_counts_a_chunk_of_at_least_one_sequence(monkeypatch):
    """Where attention's probabilities are computed again, a chunk's buffers (probabilities,
    their dropped copy, their gradient) take up to kernels/ops.CHUNK_BYTES each, but never less
    than one sequence's H x T x T: quadratic in T, which the estimate counts."""
    import numgpt.kernels.ops as ops
    cfg = get_config("scaled", block_size=1024, batch_size=16, vocab_size=65)
    H, T = cfg.n_head, cfg.block_size
    assert not ops.stores_probs(cfg.batch_size, H, T, "float32")
    one = 4 * H * T * T  # one sequence's probabilities, bytes

    def estimate(chunk_bytes):
        monkeypatch.setattr(ops, "CHUNK_BYTES", chunk_bytes)
        return training_bytes(cfg, "plain")
    assert estimate(1) == estimate(one)
    assert estimate(2 * one) - estimate(one) == 3 * one
