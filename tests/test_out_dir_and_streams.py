"""What surrounds a run: links, FIFOs and devices in out_dir (nothing is written through them),
closed or broken output streams (training goes to its end), messages that say what happened,
leftovers of killed runs, refused runs that create nothing, and a resume on other data."""
import json
import os
import resource
import subprocess
import sys

import numpy as np
import pytest
from cli_tools import one_line_error

from numgpt.checkpoint import load_checkpoint, save_checkpoint
from numgpt.config import ConfigError, get_config
from numgpt.data import load_dataset

TINY = ["--n_embd=16", "--n_head=2", "--n_layer=1", "--block_size=16", "--batch_size=4",
        "--eval_iters=2", "--warmup_iters=2"]


def run(python, repo, script, *args, fsize=None, redirect=None, stdout=subprocess.PIPE):
    """Run a script; redirect is shell text applied to it (e.g. '>&-' closes stdout)."""
    env = dict(os.environ, PYTHONPATH=repo)
    cmd = [python, os.path.join(repo, script), *args]
    if redirect is not None:
        cmd = ["sh", "-c", f'exec "$@" {redirect}', "sh", *cmd]

    def limit():  # RLIMIT_FSIZE: writes past this size fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300,
                          cwd=repo, env=env, preexec_fn=limit if fsize is not None else None)


def train_args(text_file, out, *extra, iters=4):
    return [f"--data={text_file}", f"--out_dir={out}", f"--max_iters={iters}", "--eval_interval=2",
            *TINY, *extra]


@pytest.fixture
def trained(python, repo, text_file, tmp_path):
    """out_dir of a run trained for 4 steps by train.py (evaluated at 0, 2, 4)."""
    out = str(tmp_path / "run")
    r = run(python, repo, "train.py", *train_args(text_file, out))
    assert r.returncode == 0, r.stderr
    return out


def ckpt_step(out):
    return load_checkpoint(os.path.join(out, "ckpt.npz"))[2]["step"]


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def listing(folder):
    """Names and kinds of a folder's entries, links not followed."""
    return sorted((n, os.lstat(os.path.join(folder, n)).st_mode) for n in os.listdir(folder))


# ---- the lock file ----

@pytest.mark.parametrize("kind,match", [
    ("link-to-file", "is a symbolic link"),
    ("dangling-link", "is a symbolic link"),
    ("link-to-dev-full", "is a symbolic link"),
    ("fifo", "is not a regular file"),
    ("hard-link", "has other hard links"),
    ("foreign-content", "holds something else than numgpt's lock"),
])
def test_a_lock_file_that_is_not_ours_is_refused_and_left_alone(python, repo, text_file, tmp_path,
                                                                 kind, match):
    out = tmp_path / "o"
    out.mkdir()
    lock = out / ".numgpt.lock"
    precious = tmp_path / "precious"
    precious.write_text("precious", encoding="utf-8")
    missing = tmp_path / "not-there"
    if kind == "link-to-file":
        lock.symlink_to(precious)
    elif kind == "dangling-link":
        lock.symlink_to(missing)
    elif kind == "link-to-dev-full":
        lock.symlink_to("/dev/full")
    elif kind == "fifo":
        os.mkfifo(lock)
    elif kind == "hard-link":
        os.link(precious, lock)
    else:
        lock.write_text("precious", encoding="utf-8")
    before = listing(out)
    r = run(python, repo, "train.py", *train_args(text_file, out))
    one_line_error(r, match)
    assert str(lock) in r.stderr
    assert precious.read_text(encoding="utf-8") == "precious"
    assert not os.path.lexists(missing)  # a dangling link does not create the file it names
    assert listing(out) == before  # nothing created, nothing replaced
    if kind == "foreign-content":
        assert lock.read_text(encoding="utf-8") == "precious"


def test_outputs_that_are_links_are_replaced_not_written_through(python, repo, text_file, trained,
                                                                 tmp_path):
    """A resumed run rewrites ckpt.npz, log.jsonl and loss.png by renaming a new file over the
    name: a link by that name is replaced, the file it points to is never written."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    kept = {}
    for name in ("ckpt.npz", "log.jsonl", "loss.png"):
        target = elsewhere / name
        os.replace(os.path.join(trained, name), target)
        os.symlink(target, os.path.join(trained, name))
        kept[name] = read_bytes(target)
    r = run(python, repo, "train.py", *train_args(text_file, trained, "--resume", iters=8))
    assert r.returncode == 0, r.stderr
    for name, content in kept.items():
        assert read_bytes(elsewhere / name) == content, name
        assert not os.path.islink(os.path.join(trained, name)), name
    assert ckpt_step(trained) == 8 and load_checkpoint(str(elsewhere / "ckpt.npz"))[2]["step"] == 4


@pytest.mark.parametrize("name", ["ckpt.npz", "log.jsonl", "loss.png"])
def test_a_new_run_refuses_a_dangling_link_among_its_outputs(python, repo, text_file, tmp_path,
                                                             name):
    out = tmp_path / "o"
    out.mkdir()
    (out / name).symlink_to(tmp_path / "not-there")
    r = run(python, repo, "train.py", *train_args(text_file, out))
    one_line_error(r, "already holds")
    assert not os.path.lexists(tmp_path / "not-there") and os.path.islink(out / name)


def test_out_dir_may_be_a_link_to_a_folder(python, repo, text_file, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    r = run(python, repo, "train.py", *train_args(text_file, tmp_path / "link"))
    assert r.returncode == 0, r.stderr
    assert ckpt_step(str(real)) == 4 and os.path.islink(tmp_path / "link")


# ---- closed and broken output streams ----

def test_sample_with_stdout_closed_says_so(python, repo, trained):
    r = run(python, repo, "sample.py", f"--out_dir={trained}", "--max_new_tokens=20",
            redirect=">&-")
    one_line_error(r, "cannot write the output (stdout): it is closed")
    r = run(python, repo, "sample.py", f"--out_dir={trained}", "--max_new_tokens=20",
            redirect=">&- 2>&-")
    assert r.returncode == 1  # nowhere to say it: a quiet failure


def test_sample_into_a_full_device_names_the_output_stream(python, repo, trained):
    with open("/dev/full", "w") as full:
        r = run(python, repo, "sample.py", f"--out_dir={trained}", "--max_new_tokens=20",
                stdout=full)
    one_line_error(r, "cannot write the output (stdout): No space left on device")


@pytest.mark.parametrize("redirect", [">&-", "2>&-", ">&- 2>&-", "2>/dev/full"])
def test_training_with_a_closed_output_stream_runs_to_the_end(python, repo, text_file, tmp_path,
                                                              redirect):
    out = str(tmp_path / "o")
    r = run(python, repo, "train.py", *train_args(text_file, out, iters=6), redirect=redirect)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert ckpt_step(out) == 6
    assert sorted(os.listdir(out)) == [".numgpt.lock", "ckpt.npz", "log.jsonl", "loss.png"]


def test_training_into_a_full_device_warns_once_and_runs_to_the_end(python, repo, text_file,
                                                                     tmp_path):
    out = str(tmp_path / "o")
    with open("/dev/full", "w") as full:
        r = run(python, repo, "train.py", *train_args(text_file, out, iters=6), stdout=full)
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "output (stdout): No space left on device" in warnings[0]
    assert "Traceback" not in r.stderr and ckpt_step(out) == 6


def test_training_piped_into_head_runs_to_the_end(python, repo, text_file, tmp_path):
    """python train.py | head -1: the reader leaves after one line; training goes on."""
    out = str(tmp_path / "o")
    env = dict(os.environ, PYTHONPATH=repo)
    p = subprocess.Popen([python, os.path.join(repo, "train.py"),
                          *train_args(text_file, out, iters=20)], cwd=repo, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline()
    p.stdout.close()
    stderr = p.stderr.read()
    assert p.wait(timeout=300) == 0, stderr
    assert "Traceback" not in stderr and "warning" not in stderr, stderr
    assert ckpt_step(out) == 20
    from numgpt.trainer import read_log
    assert [row["step"] for row in read_log(os.path.join(out, "log.jsonl"))][-1] == 20


# ---- messages ----

def test_a_first_run_on_a_full_disk_says_no_checkpoint_was_written(python, repo, text_file,
                                                                   tmp_path):
    load_dataset(text_file)  # prepared beforehand: only the run's own writes meet the limit
    out = tmp_path / "o"
    r = run(python, repo, "train.py", *train_args(text_file, out), fsize=2000)
    one_line_error(r, "could not write the checkpoint at step 0")
    assert "no checkpoint was written" in r.stderr and "intact" not in r.stderr
    assert not (out / "ckpt.npz").exists()
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.parametrize("script,args,match", [
    ("train.py", ["--out_dir="], "--out_dir is empty"),
    ("train.py", ["--data="], "--data is empty"),
    ("sample.py", ["--out_dir="], "--out_dir is empty"),
])
def test_empty_paths_are_refused(python, repo, text_file, tmp_path, script, args, match):
    extra = [f"--data={text_file}"] if script == "train.py" and "--data=" not in args else []
    r = run(python, repo, script, *extra, *args, *(TINY if script == "train.py" else []))
    one_line_error(r, match)


def test_data_that_is_a_loop_of_links(python, repo, tmp_path):
    loop = tmp_path / "loop.txt"
    loop.symlink_to(tmp_path / "loop2.txt")
    (tmp_path / "loop2.txt").symlink_to(loop)
    r = run(python, repo, "train.py", f"--data={loop}", f"--out_dir={tmp_path / 'o'}", *TINY)
    one_line_error(r, "loop of symbolic links")
    assert not (tmp_path / "o").exists()
    from numgpt.data import DataError, load_dataset
    with pytest.raises(DataError, match="loop of symbolic links"):  # the Python API too
        load_dataset(str(loop))


def test_whole_numbers_follow_one_rule_in_train_and_sample(python, repo, text_file, trained,
                                                           tmp_path):
    """train.py took --max_iters=1e3 while sample.py refused --max_new_tokens=1e2: now both take
    a whole number in either notation, and refuse the same non-whole ones."""
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={tmp_path / 'o'}",
            "--max_iters=1.5", *TINY)
    one_line_error(r, "max_iters must be a whole number such as 1000")
    r = run(python, repo, "sample.py", f"--out_dir={trained}", "--max_new_tokens=1.5")
    one_line_error(r, "--max_new_tokens must be a whole number")
    for bad in ("1.5", "1e-3", "1_000", "٣", "0x10", "", "nan", "inf", "1e300"):
        with pytest.raises(ConfigError, match="whole number such as 1000"):
            get_config("bigram", max_iters=bad)
    for good, value in ((" +20 ", 20), ("1e3", 1000), ("2000.0", 2000), ("5.", 5)):
        assert get_config("bigram", max_iters=good).max_iters == value
    r = run(python, repo, "sample.py", f"--out_dir={trained}", "--max_new_tokens=5e0")
    assert r.returncode == 0, r.stderr


# ---- leftovers, and refused runs that leave nothing ----

def test_a_run_removes_temporary_files_a_killed_run_left(python, repo, text_file, trained,
                                                         tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("precious", encoding="utf-8")
    stale = [".ckpt.npz.ab_d1234.tmp", ".log.jsonl.zzzzzzzz.tmp", ".loss.png.0a1b2c3d.tmp",
             ".numgpt-write-test-k9x_2mqa"]
    kept = [".ckpt.npz.tmp", ".ckpt.npz.abcd1234.tmp.mine", "ckpt.npz.abcd1234.tmp",
            ".ckpt.npz.ABCD1234.tmp", "notes.tmp"]
    for name in stale + kept:
        with open(os.path.join(trained, name), "wb") as f:
            f.write(b"x" * 1000)
    os.symlink(outside, os.path.join(trained, ".ckpt.npz.lnk12345.tmp"))  # a link: left alone
    os.mkdir(os.path.join(trained, ".log.jsonl.dir12345.tmp"))  # a folder: left alone
    kept += [".ckpt.npz.lnk12345.tmp", ".log.jsonl.dir12345.tmp"]
    r = run(python, repo, "train.py", *train_args(text_file, trained, "--resume", iters=6))
    assert r.returncode == 0, r.stderr
    names = set(os.listdir(trained))
    assert not names & set(stale)
    assert set(kept) <= names
    assert outside.read_text(encoding="utf-8") == "precious"


@pytest.mark.parametrize("case", ["memory", "block_size", "resume-missing-folder",
                                  "resume-no-checkpoint", "resume-broken-checkpoint",
                                  "holds-a-checkpoint"])
def test_a_refused_run_creates_nothing(python, repo, text_file, tmp_path, case):
    out = tmp_path / "o"
    args = train_args(text_file, out)
    if case == "memory":
        args = [a for a in args if not a.startswith("--batch_size=")] + ["--batch_size=100000000"]
    elif case == "block_size":
        args = [a for a in args if not a.startswith("--block_size=")] + ["--block_size=100000"]
    elif case.startswith("resume"):
        args.append("--resume")
    if case in ("resume-no-checkpoint", "resume-broken-checkpoint", "holds-a-checkpoint"):
        out.mkdir()
        (out / "notes.txt").write_text("mine", encoding="utf-8")
    if case == "resume-broken-checkpoint":
        (out / "ckpt.npz").write_bytes(b"PK\x03\x04 not really")
    if case == "holds-a-checkpoint":
        save_checkpoint(str(out / "ckpt.npz"), {"w": np.ones(2)}, {}, {"step": 1})
    before = listing(out) if out.exists() else None
    r = run(python, repo, "train.py", *args)
    one_line_error(r, {"memory": "memory", "block_size": "block_size"}.get(case, ""))
    assert "given twice" not in r.stderr
    assert (listing(out) if out.exists() else None) == before


def test_a_resume_that_fails_on_a_full_disk_leaves_the_log_as_it_was(python, repo, text_file,
                                                                     trained):
    log = os.path.join(trained, "log.jsonl")
    before = read_bytes(log)
    assert len(before.splitlines()) == 3  # steps 0, 2, 4
    ckpt = read_bytes(os.path.join(trained, "ckpt.npz"))
    r = run(python, repo, "train.py", *train_args(text_file, trained, "--resume", iters=8),
            fsize=len(ckpt) // 2)
    one_line_error(r, "previous checkpoint is intact")
    assert read_bytes(log) == before
    assert read_bytes(os.path.join(trained, "ckpt.npz")) == ckpt


# ---- resuming on other data ----

def test_resume_on_other_data_with_the_same_characters_is_refused(python, repo, text_file,
                                                                  trained, tmp_path):
    with open(text_file, encoding="utf-8") as f:
        text = f.read()
    other = tmp_path / "other.txt"
    other.write_text(text[::-1], encoding="utf-8")  # the same characters, another text
    assert sorted(set(other.read_text(encoding="utf-8"))) == sorted(set(text))
    before = read_bytes(os.path.join(trained, "ckpt.npz"))
    r = run(python, repo, "train.py", *train_args(other, trained, "--resume", iters=8))
    one_line_error(r, "was trained on other data")
    assert text_file in r.stderr and str(other) in r.stderr and f"--data={text_file}" in r.stderr
    assert read_bytes(os.path.join(trained, "ckpt.npz")) == before
    r = run(python, repo, "train.py", *train_args(text_file, trained, "--resume", iters=8))
    assert r.returncode == 0, r.stderr


def test_an_old_checkpoint_without_the_data_hash_still_resumes(python, repo, text_file, trained,
                                                               tmp_path):
    ckpt = os.path.join(trained, "ckpt.npz")
    params, opt, meta = load_checkpoint(ckpt)
    assert len(meta.pop("data_sha256")) == 64
    save_checkpoint(ckpt, params, opt, meta)
    other = tmp_path / "other.txt"
    with open(text_file, encoding="utf-8") as f:
        other.write_text(f.read()[::-1], encoding="utf-8")
    r = run(python, repo, "train.py", *train_args(other, trained, "--resume", iters=6))
    assert r.returncode == 0, r.stderr
    vocab_json = os.path.join(load_dataset(str(other)).folder, "vocab.json")
    with open(vocab_json, encoding="utf-8") as f:
        assert load_checkpoint(ckpt)[2]["data_sha256"] == json.load(f)["sha256"]


def test_streams_module_fills_closed_descriptors(tmp_path):
    """A file opened after the start must never land on descriptor 1 or 2."""
    code = ("import os; from numgpt import streams; streams.fill_closed_fds(); "
            "fd = os.open(%r, os.O_WRONLY | os.O_CREAT); print(fd, file=open(%r, 'w'))"
            % (str(tmp_path / "f"), str(tmp_path / "fd")))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run(["sh", "-c", 'exec "$@" <&- >&- 2>&-', "sh", sys.executable, "-c", code],
                   check=True, env=env, timeout=60)
    assert int((tmp_path / "fd").read_text()) > 2
