"""The user journey: data preparation (local copy, verified download from a local server),
train.py with --key=value, checkpoints, resume that matches an uninterrupted run, sample.py,
and one-line errors for bad input."""
import functools
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import numgpt
from numgpt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from numgpt.data import (SHAKESPEARE_SHA256, DataError, Dataset, Vocab, download, load_dataset,
                         local_shakespeare_candidates, prepare)
from numgpt.trainer import read_log, train

TINY = ["--n_embd=16", "--n_head=2", "--n_layer=1", "--block_size=16", "--batch_size=4",
        "--eval_iters=2", "--warmup_iters=2"]


def run(python, repo, script, *args, timeout=300, cwd=None):
    env = dict(os.environ, PYTHONPATH=repo)
    return subprocess.run([python, os.path.join(repo, script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or repo, env=env)


def shakespeare_path():
    for p in local_shakespeare_candidates():
        if os.path.isfile(p):
            return p
    pytest.skip("no local copy of Tiny Shakespeare")


# ---- data ----

def test_prepare_splits_90_10_and_saves_vocab_as_json(text_file, tmp_path):
    out = tmp_path / "prep"
    prepare(text_file, str(out))
    ds = Dataset(str(out))
    text = open(text_file, encoding="utf-8").read()
    assert len(ds.train) == int(0.9 * len(text)) and len(ds.train) + len(ds.val) == len(text)
    assert ds.train.dtype == np.uint16
    meta = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert meta["chars"] == sorted(set(text)) and "é" in meta["chars"]
    assert ds.vocab.decode(np.concatenate([ds.train, ds.val])) == text


def test_shakespeare_prepares_to_65_characters(tmp_path):
    src = shakespeare_path()
    prepare(src, str(tmp_path))
    ds = Dataset(str(tmp_path))
    assert len(ds.vocab) == 65 and len(ds.train) == 1003854 and len(ds.val) == 111540


def test_batches_are_shifted_by_one(text_file, tmp_path):
    prepare(text_file, str(tmp_path))
    ds = Dataset(str(tmp_path))
    x, y = ds.get_batch("train", 5, 12, np.random.default_rng(0))
    assert x.shape == y.shape == (5, 12)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


class _Server:
    def __init__(self, folder):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def test_download_verifies_sha256_from_a_local_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    body = b"hello world\n" * 100
    (served / "input.txt").write_bytes(body)
    good = hashlib.sha256(body).hexdigest()
    dest = tmp_path / "got" / "input.txt"
    with _Server(served) as srv:
        download(srv.url + "input.txt", str(dest), good)
        assert dest.read_bytes() == body
        dest2 = tmp_path / "got2" / "input.txt"
        with pytest.raises(DataError, match="sha256"):
            download(srv.url + "input.txt", str(dest2), SHAKESPEARE_SHA256)
        assert not dest2.exists()
        with pytest.raises(DataError, match="could not download"):
            download(srv.url + "missing.txt", str(dest2), good)
    assert not any(p.name.endswith(".tmp") for p in dest.parent.iterdir())


def test_download_of_tiny_shakespeare_through_the_product(tmp_path, monkeypatch):
    """find_or_fetch_shakespeare falls back to the (here: local) URL and checks the real sha256."""
    import numgpt.data as d
    src = shakespeare_path()
    served = tmp_path / "served"
    served.mkdir()
    (served / "input.txt").write_bytes(open(src, "rb").read())
    monkeypatch.setattr(d, "SHAKESPEARE_DIR", str(tmp_path / "shakespeare_char"))
    monkeypatch.setattr(d, "local_shakespeare_candidates", lambda: [])
    with _Server(served) as srv:
        path = d.find_or_fetch_shakespeare(url=srv.url + "input.txt")
    assert d.sha256_file(path) == SHAKESPEARE_SHA256


def test_a_wrong_numgpt_shakespeare_is_an_error_not_passed_over(tmp_path, monkeypatch):
    """NUMGPT_SHAKESPEARE naming no file, or another text, is said, never skipped for a download
    (which offline said only that the download failed)."""
    import numgpt.data as d
    monkeypatch.setattr(d, "SHAKESPEARE_DIR", str(tmp_path / "shakespeare_char"))
    monkeypatch.setenv("NUMGPT_SHAKESPEARE", str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match=r"missing.txt \(NUMGPT_SHAKESPEARE\) is not a file"):
        d.find_or_fetch_shakespeare(url="http://127.0.0.1:9/input.txt")
    other = tmp_path / "other.txt"
    other.write_text("not the play", encoding="utf-8")
    monkeypatch.setenv("NUMGPT_SHAKESPEARE", str(other))
    with pytest.raises(DataError, match=r"is not Tiny Shakespeare \(sha256 differs\)"):
        d.find_or_fetch_shakespeare(url="http://127.0.0.1:9/input.txt")
    assert not os.path.exists(tmp_path / "shakespeare_char")


def test_a_text_too_short_for_the_block_is_refused_before_it_is_prepared(text_file, tmp_path):
    import numgpt.data as d
    with pytest.raises(DataError, match="fewer than block_size"):
        load_dataset(text_file, block_size=100000)
    assert not os.path.exists(d.DATA_DIR)
    assert len(load_dataset(text_file, block_size=16).train) > 16  # long enough: prepared


def test_offline_download_says_where_to_put_the_file(tmp_path):
    with pytest.raises(DataError, match="put the file at"):
        download("http://127.0.0.1:9/input.txt", str(tmp_path / "x.txt"), timeout=2)


@pytest.mark.parametrize("content,match", [(None, "not found"), (b"", "empty"),
                                           (b"\xff\xfe\x00abc", "not UTF-8")])
def test_bad_data_files(tmp_path, content, match):
    p = tmp_path / "data.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_dataset(str(p))


def test_vocab_refuses_unknown_characters():
    v = Vocab("abc")
    np.testing.assert_array_equal(v.encode("cab"), [2, 0, 1])
    with pytest.raises(DataError, match="not in the vocabulary"):
        v.encode("abz")


# ---- training, checkpoints, resume ----

def small_cfg(**kw):
    base = dict(n_embd=16, n_head=2, n_layer=2, block_size=16, batch_size=4, max_iters=30,
                eval_interval=10, eval_iters=2, dropout=0.1, warmup_iters=3)
    base.update(kw)
    return numgpt.get_config("laptop", **base)


def test_resumed_run_matches_an_uninterrupted_run(text_file, tmp_path):
    ds = load_dataset(text_file)
    full = train(small_cfg(), ds, str(tmp_path / "full"), quiet=True, sample_chars=0)
    part = train(small_cfg(), ds, str(tmp_path / "part"), quiet=True, sample_chars=0, stop_at=14)
    assert part["interrupted"] and part["step"] == 14
    _, _, meta = load_checkpoint(os.path.join(tmp_path, "part", "ckpt.npz"))
    assert meta["step"] == 14
    rest = train(small_cfg(), ds, str(tmp_path / "part"), resume=True, quiet=True, sample_chars=0)
    assert rest["step"] == 30
    a = [(r["step"], r["train_loss"], r["val_loss"]) for r in read_log(full["log"])]
    b = [(r["step"], r["train_loss"], r["val_loss"]) for r in read_log(rest["log"])]
    assert a == b and [s for s, _, _ in a] == [0, 10, 20, 30]
    pa, _, _ = load_checkpoint(full["checkpoint"])
    pb, _, _ = load_checkpoint(rest["checkpoint"])
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])


def test_a_resumed_run_stopped_before_it_evaluates(text_file, tmp_path):
    """Ctrl-C after a resume and before the next evaluation: a checkpoint, and the losses last
    logged (it ended in a TypeError)."""
    ds = load_dataset(text_file)
    out = str(tmp_path / "o")
    train(small_cfg(), ds, out, quiet=True, sample_chars=0, stop_at=13)
    r = train(small_cfg(), ds, out, resume=True, quiet=True, sample_chars=0, stop_at=15)
    assert r["interrupted"] and r["step"] == 15
    assert r["val_loss"] == read_log(r["log"])[-1]["val_loss"]  # step 10's
    _, _, meta = load_checkpoint(r["checkpoint"])
    assert meta["step"] == 15


def test_resume_refuses_another_config_or_vocabulary(text_file, tmp_path):
    ds = load_dataset(text_file)
    out = str(tmp_path / "o")
    train(small_cfg(max_iters=5, eval_interval=5), ds, out, quiet=True, sample_chars=0)
    from numgpt.trainer import TrainingError
    with pytest.raises(TrainingError, match="n_embd"):
        train(small_cfg(n_embd=32), ds, out, resume=True, quiet=True)
    with pytest.raises(TrainingError, match="already holds a checkpoint"):
        train(small_cfg(), ds, out, quiet=True)


def test_resume_refuses_a_length_it_is_past_and_says_what_changed(python, repo, text_file,
                                                                    tmp_path):
    """A --max_iters below the step a run is at is refused, the checkpoint left as it was (it once
    ran no step, then stored the shorter length); a changed learning rate is named when it
    resumes."""
    out = str(tmp_path / "run")
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={out}", "--max_iters=6",
            "--eval_interval=3", *TINY)
    assert r.returncode == 0, r.stderr
    ckpt = os.path.join(out, "ckpt.npz")
    before = open(ckpt, "rb").read()
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={out}", "--resume",
            "--max_iters=4", *TINY)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: --resume: the run in {out} is at step 6, past --max_iters=4; give a larger "
        "--max_iters to train it further"], r.stderr
    assert open(ckpt, "rb").read() == before
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={out}", "--resume",
            "--max_iters=8", "--eval_interval=3", "--learning_rate=0.001", *TINY)  # laptop: 2e-3
    assert r.returncode == 0, r.stderr
    assert f"resuming from step 6 of 8 in {out}, with learning_rate 0.001 (was 0.002)" in r.stdout
    _, _, meta = load_checkpoint(ckpt)
    assert meta["step"] == 8


def test_resume_continues_the_runs_own_config(python, repo, text_file, tmp_path):
    """--resume without --preset takes the config from the checkpoint (it once started from the
    laptop preset and refused the run, listing eight settings the user never gave); with
    --preset, that preset must give the run's config."""
    out = str(tmp_path / "run")
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={out}",
            "--preset=bigram", "--max_iters=4", "--eval_interval=2", "--eval_iters=2")
    assert r.returncode == 0, r.stderr
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={out}", "--resume",
            "--max_iters=6")
    assert r.returncode == 0, r.stderr
    assert f"resuming from step 4 of 6 in {out}\n" in r.stdout
    _, _, meta = load_checkpoint(os.path.join(out, "ckpt.npz"))
    assert meta["step"] == 6 and meta["config"]["model"] == "bigram"
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={out}", "--resume",
            "--preset=preln", "--max_iters=8")
    assert r.returncode == 1 and "was trained with other settings of" in r.stderr, r.stderr


def test_checkpoint_refuses_pickles_and_corruption(tmp_path):
    p = tmp_path / "evil.npz"
    np.savez(p, meta=np.array([{"format": "x"}], dtype=object))
    with pytest.raises(CheckpointError, match="pickled"):
        load_checkpoint(str(p))
    good = tmp_path / "good.npz"
    save_checkpoint(str(good), {"w": np.ones(3)}, {}, {"step": 1})
    params, _, meta = load_checkpoint(str(good))
    assert meta["step"] == 1 and params["w"].tolist() == [1, 1, 1]
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(str(cut))
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.zeros(2))
    with pytest.raises(CheckpointError, match="not a numgpt checkpoint"):
        load_checkpoint(str(foreign))


def test_train_and_sample_commands(python, repo, text_file, tmp_path):
    out = str(tmp_path / "run")
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={out}", "--max_iters=20",
            "--eval_interval=10", *TINY)
    assert r.returncode == 0, r.stderr
    assert "step 20: train" in r.stdout
    for f in ("ckpt.npz", "log.jsonl", "loss.png"):
        assert os.path.isfile(os.path.join(out, f))
    assert [row["step"] for row in read_log(os.path.join(out, "log.jsonl"))] == [0, 10, 20]
    r = run(python, repo, "sample.py", f"--out_dir={out}", "--start=to be", "--max_new_tokens=40",
            "--num_samples=2", "--top_k=5", "--seed=3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("to be") >= 2 and len(r.stdout) > 80
    r2 = run(python, repo, "sample.py", f"--out_dir={out}", "--start=to be", "--max_new_tokens=40",
             "--num_samples=2", "--top_k=5", "--seed=3")
    assert r2.stdout == r.stdout  # the seed makes samples reproducible
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("or not", encoding="utf-8")
    r = run(python, repo, "sample.py", f"--out_dir={out}", f"--start=FILE:{prompt}",
            "--max_new_tokens=10", "--top_p=0.9", "--temperature=0.5")
    assert r.returncode == 0 and r.stdout.startswith("or not"), r.stderr


@pytest.mark.parametrize("args,match", [
    (["--n_embd=30", "--n_head=4"], "divisible"),
    (["--no_such_key=1"], "unknown option"),
    (["--n_layer=two"], "whole number"),
    (["--dropout=1.5"], "dropout"),
    (["--learning_rate=-1"], "learning_rate"),
    (["--max_iters=0"], "max_iters"),
    (["--preset=huge"], "unknown preset"),
    (["--block_size=100000"], "fewer than block_size"),
])
def test_train_refuses_bad_input_in_one_line(python, repo, text_file, tmp_path, args, match):
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={tmp_path / 'o'}", *args)
    assert r.returncode != 0
    assert match in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "o" / "ckpt.npz")
    assert not os.path.exists(tmp_path / "o")  # a refused run creates nothing
    if match == "fewer than block_size":  # refused before the text was prepared
        assert not os.path.exists(tmp_path / "data-cache")


def test_options_take_their_value_after_an_equals_sign_or_a_space():
    from numgpt.cli import parse_flags
    from numgpt.config import ConfigError
    known = {"preset", "max_iters", "start"}
    assert parse_flags(["--preset", "preln", "--max_iters=5", "--resume", "--start", "-x"], known,
                       flags=("resume",)) == {"preset": "preln", "max_iters": "5", "resume": True,
                                              "start": "-x"}
    for argv, said in [(["--bogus"], "unknown option --bogus"),  # (once: '--bogus needs a value')
                       (["--bogus", "1"], "unknown option --bogus"),
                       (["--max_iters"], "--max_iters needs a value"),
                       (["--max_iters", "--preset=x"], "--max_iters needs a value"),
                       (["--preset", "a", "--preset=b"], "--preset is given twice"),
                       (["preln"], "unexpected argument 'preln'")]:
        with pytest.raises(ConfigError, match=said):
            parse_flags(argv, known, flags=("resume",))


def test_the_ladder_takes_train_pys_spelling_and_errs_in_one_line(python, repo, tmp_path):
    """--out_dir (train.py's spelling) works as --out-dir; an unknown option is one line, not
    argparse's usage block."""
    r = subprocess.run([python, "-m", "numgpt.ladder", "--seeds=0", f"--out_dir={tmp_path / 'l'}",
                        "--iters_scale=0.5"], capture_output=True, text=True, cwd=repo,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --seeds must be at least 1", r.stderr
    r = subprocess.run([python, "-m", "numgpt.ladder", "--outdir=x"], capture_output=True,
                       text=True, cwd=repo, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: unrecognized arguments: --outdir=x (see python -m numgpt.ladder --help)"]
    assert not os.path.exists(tmp_path / "l")


def test_help_says_what_each_option_does(python, repo, tmp_path):
    r = run(python, repo, "sample.py", "--help")
    assert r.returncode == 0
    for option, default in [("--out_dir", "out"), ("--start", "a newline"),
                            ("--num_samples", "1"), ("--max_new_tokens", "500"),
                            ("--temperature", "0.8"), ("--top_k", "0, off"),
                            ("--top_p", "1.0, off"), ("--seed", "1337")]:
        assert f"  {option}=" in r.stdout and f"(default: {default})" in r.stdout, option
    r = run(python, repo, os.path.join("data", "shakespeare_char", "prepare.py"), "--help",
            cwd=str(tmp_path))
    assert r.returncode == 0 and "prepare.py PATH" in r.stdout and not r.stderr


def test_an_out_dir_that_is_a_file_is_said_so(python, repo, text_file, tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine", encoding="utf-8")
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={f}", "--max_iters=2",
            *TINY)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: cannot write to out_dir {f}: it is a file, not a folder; give another "
        "--out_dir"], r.stderr
    assert f.read_text(encoding="utf-8") == "mine"


def test_sample_refuses_bad_input_in_one_line(python, repo, text_file, tmp_path):
    out = str(tmp_path / "run")
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={out}", "--max_iters=2",
            "--eval_interval=2", *TINY)
    assert r.returncode == 0, r.stderr
    for args, match in [(["--start=XYZ~"], "not in the vocabulary"),
                        ([f"--out_dir={tmp_path / 'none'}"], "no checkpoint"),
                        (["--temperature=abc"], "temperature"),
                        (["--top_p=0"], "top_p")]:
        r = run(python, repo, "sample.py", f"--out_dir={out}", *args) if "--out_dir" not in args[0] \
            else run(python, repo, "sample.py", *args)
        assert r.returncode != 0 and match in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_kill_9_then_resume_loses_only_steps_since_the_checkpoint(python, repo, text_file, tmp_path):
    out = str(tmp_path / "k")
    args = [f"--data={text_file}", f"--out_dir={out}", "--max_iters=100000", "--eval_interval=5",
            *TINY]
    env = dict(os.environ, PYTHONPATH=repo)
    p = subprocess.Popen([python, os.path.join(repo, "train.py"), *args], cwd=repo, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(out, "ckpt.npz")
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(ckpt):
            try:
                if load_checkpoint(ckpt)[2]["step"] >= 20:
                    break
            except CheckpointError:
                pytest.fail("a checkpoint on disk was not loadable")
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    _, _, meta = load_checkpoint(ckpt)  # loadable after kill -9
    step = meta["step"]
    assert step >= 20 and step % 5 == 0
    # resume in-process up to step + 7 and compare with a run that was never killed
    cfg = numgpt.get_config("laptop", max_iters=100000, eval_interval=5,
                            **{a[2:].split("=")[0]: a.split("=")[1] for a in TINY})
    ds = load_dataset(text_file)
    resumed = train(cfg, ds, out, resume=True, stop_at=step + 7, quiet=True, sample_chars=0)
    # a kill during a write leaves its temporary file; the resumed run removed it
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    clean = train(cfg, ds, str(tmp_path / "clean"), stop_at=step + 7, quiet=True, sample_chars=0)
    pa, _, _ = load_checkpoint(resumed["checkpoint"])
    pb, _, _ = load_checkpoint(clean["checkpoint"])
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])
    a = [(r["step"], r["val_loss"]) for r in read_log(resumed["log"])]
    b = [(r["step"], r["val_loss"]) for r in read_log(clean["log"])]
    assert a == b


def test_ctrl_c_saves_and_exits_cleanly(python, repo, text_file, tmp_path):
    out = str(tmp_path / "c")
    env = dict(os.environ, PYTHONPATH=repo)
    p = subprocess.Popen([python, os.path.join(repo, "train.py"), f"--data={text_file}",
                          f"--out_dir={out}", "--max_iters=100000", "--eval_interval=1000", *TINY],
                         cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = os.path.join(out, "ckpt.npz")
    deadline = time.time() + 120
    while not read_log(os.path.join(out, "log.jsonl")) and time.time() < deadline:
        time.sleep(0.05)  # the first eval (checkpoint, log) is done: steps are running
    time.sleep(1.5)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr
    assert "continue with --resume" in stdout
    _, _, meta = load_checkpoint(ckpt)
    assert meta["step"] > 0


def test_two_runs_cannot_share_an_out_dir(python, repo, text_file, tmp_path):
    out = str(tmp_path / "shared")
    env = dict(os.environ, PYTHONPATH=repo)
    p = subprocess.Popen([python, os.path.join(repo, "train.py"), f"--data={text_file}",
                          f"--out_dir={out}", "--max_iters=100000", "--eval_interval=1000", *TINY],
                         cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, "ckpt.npz")) and time.time() < deadline:
            time.sleep(0.05)
        r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={out}", "--resume",
                *TINY)
        assert r.returncode != 0 and "another training run" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    finally:
        p.kill()
        p.wait()
    # the lock dies with its process: a later run may resume (a step or two past the checkpoint)
    _, _, meta = load_checkpoint(os.path.join(out, "ckpt.npz"))
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={out}", "--resume",
            f"--max_iters={meta['step'] + 2}", "--eval_interval=1000", *TINY)
    assert r.returncode == 0, r.stderr


def test_the_readmes_python_api_runs():
    """The README's Python API examples, run as written (in one namespace, in order), in a
    fresh process that imports NumPy first; the fast step says which it took."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) >= 2 and "numgpt.training_step" in blocks[-1]
    code = "\n".join(blocks) + "\nprint('loss', float(loss), step.name)\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, cwd=repo, env=dict(os.environ, PYTHONPATH=repo))
    assert r.returncode == 0, r.stderr
    # (a cold kernel cache first says that it compiles)
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("compiling numba kernels")]
    assert lines[0].startswith("step: ")
    loss, name = lines[-1].split()[1:]
    assert np.isfinite(float(loss)) and name in numgpt.parallel.STEPS
