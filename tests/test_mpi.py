"""Data-parallel training over MPI (numgpt/distributed.py).

(Named to run after tests/test_kernels.py, which compiles the kernels when their cache is new,
so that the ranks here load them rather than compile them twice at once.)

Under `mpiexec -n 2` (tests/mpi_job.py, one job for all the equality tests): 20 float64 steps
equal one process's to 1e-12, and training (a ladder rung, the laptop preset, a config with
dropout, and a run started in one process and resumed on two) equals one process's to float32
rounding. Then train.py itself under mpiexec: SIGTERM saves one checkpoint and stops every rank,
the run resumes in one process as if never stopped; a rank killed or hung ends the job, the
checkpoint intact. Without mpi4py the MPI tests skip, except under CI (tests/required.py),
where they fail; the rest (masks of a slice of the batch, the launcher without mpi4py)
always run.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import numgpt
from numgpt import distributed
from numgpt.layers.dropout import BatchRows, keep_mask

from cli_tools import one_line_error
from required import may_not_skip
from mpi_job import (FLOAT64_CONFIGS, RESUME_AT, RESUMED, STEPS, TRAIN_CONFIGS, float64_run,
                     recording_losses)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TRAIN_PY = os.path.join(REPO, "train.py")

# float32: the loss of every step, and the logged losses (the mean of eval_iters batches, every
# 10 steps), within LOSS_RTOL of one process's, and every final weight within WEIGHT_ATOL. The
# ranks sum their shares of a gradient in another order than one process's matrix products, so
# the runs differ by float32 rounding (~6e-8 relative) from the first step on, and AdamW carries
# the differences on: in 20 steps here the losses moved by at most 1e-6 relative and, with GELU,
# the weights by at most 2e-5. With ReLU a few weights can move by up to 5e-4: a hidden unit's
# input within rounding of 0 is on one side of the kink in one run and on the other side in the
# other. One process's own two-thread and one-thread steps differ by as much (4.8e-4 on
# dropout_relu, same seed, same masks), so ReLU configs get RELU_WEIGHT_ATOL. (When one process
# and the ranks all take the fused step, the laptop preset comes out bit for bit: one process
# splits its batch (8) into the same two halves on its two threads; when the ranks measured
# their plain step faster, a fresh clone saw 8e-5.)
LOSS_RTOL = 2e-5
WEIGHT_ATOL = 5e-5
RELU_WEIGHT_ATOL = 2e-3
FLOAT64_TOL = 1e-12


@pytest.fixture(scope="module")
def mpiexec():
    """The mpiexec beside this Python (mpich's wheel puts it there), or on PATH."""
    try:
        import mpi4py  # noqa: F401  (the package only: MPI starts with mpi4py.MPI)
    except ImportError:
        if may_not_skip():
            pytest.fail('mpi4py is not installed, and this is CI (tests/required.py): the '
                        'MPI tests must run: pip install -e ".[mpi]"')
        pytest.skip('mpi4py is not installed (pip install -e ".[mpi]")')
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if found is None:
        if may_not_skip():
            pytest.fail("mpi4py is installed but no mpiexec was found")
        pytest.skip("no mpiexec")
    return found


def _env(**extra):
    env = dict(os.environ, NUMGPT_MPI_TIMEOUT="60", PYTHONPATH=REPO)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _corpus(path):
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis",
             "nobler", "in", "mind", "suffer", "é"]
    path.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(400)) + "\n",
                    encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def job(mpiexec, tmp_path_factory):
    """tests/mpi_job.py run once under mpiexec -n 2: (its out folder, the text it trained on)."""
    from numgpt import data
    from numgpt.trainer import train
    root = tmp_path_factory.mktemp("mpi")
    text = _corpus(root / "corpus.txt")
    out = root / "out"
    out.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "DATA_DIR", str(root / "data"))
        ds = data.load_dataset(text)
        train(TRAIN_CONFIGS[RESUMED], ds, str(out / "resume"), stop_at=RESUME_AT, quiet=True,
              sample_chars=0, world=distributed.SINGLE)
    r = subprocess.run([mpiexec, "-n", "2", sys.executable, os.path.join(HERE, "mpi_job.py"),
                        str(out), text], env=_env(NUMGPT_DATA_DIR=root / "data-mpi",
                                                  NUMGPT_MPI_TIMEOUT=600),  # (a first compile)
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and (out / "done").is_file(), r.stdout + r.stderr
    assert (out / "done").read_text() == "2 ranks, 1 threads each\n"  # 2 cores here: 1 each
    return out, text


@pytest.mark.parametrize("name", list(FLOAT64_CONFIGS))
def test_float64_steps_on_two_ranks_equal_one_process(job, name):
    out, _ = job
    got = np.load(out / f"float64-{name}.npz")
    losses, params = float64_run(FLOAT64_CONFIGS[name])
    np.testing.assert_allclose(got["losses"], losses, rtol=FLOAT64_TOL, atol=0)
    for k, v in params.items():
        np.testing.assert_allclose(got[k], v, rtol=0, atol=FLOAT64_TOL, err_msg=k)


def _same_run(a, b, weight_atol=WEIGHT_ATOL):
    """Two finished runs' out folders hold the same losses after each step and the same
    weights, to float32 rounding."""
    from numgpt.checkpoint import read_model_checkpoint
    from numgpt.trainer import read_log
    ra, rb = read_log(os.path.join(a, "log.jsonl")), read_log(os.path.join(b, "log.jsonl"))
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose([r[key] for r in ra], [r[key] for r in rb], rtol=LOSS_RTOL)
    _, _, pa, _, ma = read_model_checkpoint(os.path.join(a, "ckpt.npz"))
    _, _, pb, _, mb = read_model_checkpoint(os.path.join(b, "ckpt.npz"))
    assert ma["step"] == mb["step"] and ma["rng_state"] == mb["rng_state"]
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=0, atol=weight_atol, err_msg=k)


@pytest.mark.parametrize("name", list(TRAIN_CONFIGS) + ["resume"])
def test_training_on_two_ranks_equals_one_process(job, name, tmp_path):
    """The loss of each of the 20 steps, the logged losses and the final weights; "resume": a run
    stopped at step 10 in one process and finished on two equals one process's whole run."""
    from numgpt.data import load_dataset
    from numgpt.trainer import train
    out, text = job
    cfg = TRAIN_CONFIGS[RESUMED if name == "resume" else name]
    with recording_losses() as losses:
        train(cfg, load_dataset(text), str(tmp_path / "one"), quiet=True, sample_chars=0,
              world=distributed.SINGLE)
    got = np.load(out / f"{name}-losses.npy")
    assert len(losses) == STEPS and len(got) == (STEPS - RESUME_AT if name == "resume" else STEPS)
    np.testing.assert_allclose(got, losses[-len(got):], rtol=LOSS_RTOL)
    _same_run(str(out / name), str(tmp_path / "one"),
              WEIGHT_ATOL if cfg.activation == "gelu" else RELU_WEIGHT_ATOL)


def _wait_for_log_step(path, step, p, timeout=120):
    """Wait until the run's log has a row at `step` or later (the run p must still be going)."""
    from numgpt.trainer import read_log
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = read_log(path)
        if rows and rows[-1]["step"] >= step:
            return rows[-1]["step"]
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no log row at step {step} after {timeout} s")


def _rank_pids(out_dir):
    """{rank: pid} of the train.py processes writing out_dir (read from /proc)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if f"--out_dir={out_dir}".encode() in cmd and b"PMI_RANK" in env:
            found[int(env[b"PMI_RANK"])] = int(pid)
    return found


# (no learning-rate decay: the schedule then does not depend on max_iters; GELU: see LOSS_RTOL)
LAPTOP_2 = ("--preset=laptop", "--n_layer=2", "--activation=gelu", "--decay_lr=false")


def _all_gone(out_dir, timeout=30):
    """Whether every rank of the run in out_dir has ended (mpiexec may exit while the ranks it
    killed are still going away)."""
    deadline = time.monotonic() + timeout
    while _rank_pids(out_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _rank_pids(out_dir) == {}


def _start(mpiexec, text, out_dir, *args, **env):
    return subprocess.Popen([mpiexec, "-n", "2", sys.executable, TRAIN_PY, f"--data={text}",
                             f"--out_dir={out_dir}", *LAPTOP_2,
                             "--max_iters=100000", "--eval_iters=2", *args],
                            env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_sigterm_stops_every_rank_with_one_checkpoint_and_one_process_resumes(
        mpiexec, text_file, tmp_path):
    """SIGTERM to mpiexec (which passes it to every rank): the ranks agree on the step to stop
    at, rank 0 saves it once, all exit 0; the run resumed in one process (another number of
    ranks) then equals one process's uninterrupted run."""
    from numgpt.checkpoint import read_model_checkpoint
    from numgpt.data import load_dataset
    from numgpt.trainer import train
    out = tmp_path / "two"
    p = _start(mpiexec, text_file, out, "--eval_interval=10")
    try:
        _wait_for_log_step(str(out / "log.jsonl"), 10, p)
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 0, stderr
    assert "Traceback" not in stderr and "error" not in stderr, stderr
    assert stdout.count("stopped at step") == 1, stdout
    stopped = read_model_checkpoint(str(out / "ckpt.npz"))[4]["step"]
    assert f"stopped at step {stopped};" in stdout
    end = stopped + 5
    r = subprocess.run([sys.executable, TRAIN_PY, f"--data={text_file}", f"--out_dir={out}",
                        *LAPTOP_2, f"--max_iters={end}", "--eval_iters=2", "--eval_interval=10",
                        "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cfg = numgpt.get_config("laptop", n_layer=2, activation="gelu", decay_lr=False, max_iters=end,
                            eval_iters=2, eval_interval=10)
    train(cfg, load_dataset(text_file), str(tmp_path / "one"), quiet=True, sample_chars=0,
          world=distributed.SINGLE)
    _same_run(str(out), str(tmp_path / "one"))


def _check_resumable(text_file, out):
    """The checkpoint in out loads and its run goes on in one process."""
    from numgpt.checkpoint import read_model_checkpoint
    step = read_model_checkpoint(str(out / "ckpt.npz"))[4]["step"]
    r = subprocess.run([sys.executable, TRAIN_PY, f"--data={text_file}", f"--out_dir={out}",
                        *LAPTOP_2, f"--max_iters={step + 2}",
                        "--eval_iters=2", "--eval_interval=5", "--resume"],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"resuming from step {step}" in r.stdout, r.stderr


def test_a_killed_rank_ends_the_job_and_the_checkpoint_is_intact(mpiexec, text_file, tmp_path):
    out = tmp_path / "run"
    p = _start(mpiexec, text_file, out, "--eval_interval=5")
    try:
        _wait_for_log_step(str(out / "log.jsonl"), 5, p)
        os.kill(_rank_pids(out)[1], signal.SIGKILL)
        p.communicate(timeout=120)  # mpiexec ends the other rank and says which one died
    finally:
        p.kill()
    assert p.returncode != 0
    assert _all_gone(out)
    _check_resumable(text_file, out)


def test_a_hung_rank_ends_the_job_in_one_line(mpiexec, text_file, tmp_path):
    """A rank stopped (SIGSTOP) mid-run: rank 0 waits NUMGPT_MPI_TIMEOUT seconds in a
    collective, then says so in one line and ends the job; the last checkpoint is intact."""
    out = tmp_path / "run"
    p = _start(mpiexec, text_file, out, "--eval_interval=5", NUMGPT_MPI_TIMEOUT=2)
    pids = {}
    try:
        _wait_for_log_step(str(out / "log.jsonl"), 5, p)
        pids = _rank_pids(out)
        os.kill(pids[1], signal.SIGSTOP)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        p.kill()
        for pid in pids.values():  # nothing left behind, whatever happened
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    r = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    one_line_error(r, "waited")
    assert "rank 0 waited" in stderr and "NUMGPT_MPI_TIMEOUT=2" in stderr
    assert _all_gone(out)
    from numgpt.checkpoint import read_model_checkpoint
    assert read_model_checkpoint(str(out / "ckpt.npz"))[4]["step"] >= 5


def test_an_error_under_mpiexec_is_said_once(mpiexec, text_file, tmp_path):
    """Every rank meets it; rank 0 says it, and the job ends with its exit status."""
    r = subprocess.run([mpiexec, "-n", "2", sys.executable, TRAIN_PY, f"--data={text_file}",
                        f"--out_dir={tmp_path / 'out'}", "--preset=preln", "--batch_size=1"],
                       env=_env(), capture_output=True, text=True, timeout=120)
    one_line_error(r, "batch_size 1 cannot be split over 2 ranks")
    assert r.returncode == 2 and not (tmp_path / "out").exists()


def test_a_time_budget_is_fixed_by_rank_0_and_kept_by_every_rank(mpiexec, text_file, tmp_path):
    """--max_time under mpiexec: every rank takes the steps rank 0 times (each ends in an
    Allreduce, so a rank that took one more would hang the job), rank 0 fixes the number and
    sends it; the job ends with that many steps, said once."""
    from numgpt.checkpoint import read_model_checkpoint
    out = tmp_path / "run"
    r = subprocess.run([mpiexec, "-n", "2", sys.executable, TRAIN_PY, f"--data={text_file}",
                        f"--out_dir={out}", *LAPTOP_2, "--max_time=15s", "--eval_iters=2"],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("time budget 15s: ")]
    assert len(lines) == 1, r.stdout
    n = int(lines[0].split(": ")[1].split(" steps")[0].replace(",", ""))
    meta = read_model_checkpoint(str(out / "ckpt.npz"))[4]
    assert n >= 1 and meta["step"] == meta["config"]["max_iters"] == n
    assert meta["ranks"] == 2


def test_a_budget_that_holds_no_training_is_said_once_under_mpiexec(mpiexec, text_file, tmp_path):
    """Rank 0 finds that not one step fits (an evaluation alone is longer than the budget) and
    sends the reason: one line, exit 2, and the out_dir it made is gone."""
    out = tmp_path / "run"
    r = subprocess.run([mpiexec, "-n", "2", sys.executable, TRAIN_PY, f"--data={text_file}",
                        f"--out_dir={out}", *LAPTOP_2, "--max_time=1s", "--eval_iters=20000"],
                       env=_env(), capture_output=True, text=True, timeout=300)
    one_line_error(r, "holds no training here")
    assert r.returncode == 2 and not out.exists()


def test_ranks_started_with_other_options_refuse_to_train(mpiexec, text_file, tmp_path):
    """Two programs in one job (MPMD) whose configs differ: the rank that differs says which
    field, and the job ends before anything is written."""
    run = [sys.executable, TRAIN_PY, f"--data={text_file}", f"--out_dir={tmp_path / 'out'}",
           "--preset=preln"]
    r = subprocess.run([mpiexec, "-n", "1", *run, "--seed=1", ":", "-n", "1", *run, "--seed=2"],
                       env=_env(), capture_output=True, text=True, timeout=120)
    one_line_error(r, "rank 1 runs with another seed than rank 0 (2, not 1)")
    assert r.returncode == 2


def test_another_mpis_mpiexec_is_refused(mpiexec, text_file, tmp_path):
    """The launcher says 2 ranks (its variables) but mpi4py's MPI sees one process."""
    r = subprocess.run([sys.executable, TRAIN_PY, f"--data={text_file}",
                        f"--out_dir={tmp_path / 'out'}"], env=_env(PMI_RANK=0, PMI_SIZE=2),
                       capture_output=True, text=True, timeout=120)
    one_line_error(r, "that mpiexec belongs to another MPI than mpi4py's")
    assert not (tmp_path / "out").exists()


# ---- without MPI ----

@pytest.mark.parametrize("rank", [0, 1])
def test_under_mpiexec_without_mpi4py_rank_0_says_what_to_install(rank, text_file, tmp_path):
    """Started as one of 2 ranks (the launcher's variables) where mpi4py cannot be imported:
    rank 0 says in one line what to install, the others exit as quietly; nothing is trained."""
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "from numgpt.cli import run, train_main\n"
            "sys.exit(run(train_main, keep_going=True))")
    r = subprocess.run([sys.executable, "-c", code, f"--data={text_file}",
                        f"--out_dir={tmp_path / 'out'}"], env=_env(PMI_RANK=rank, PMI_SIZE=2),
                       capture_output=True, text=True, timeout=120)
    if rank == 0:
        one_line_error(r, 'pip install "numgpt[mpi]"')
    else:
        assert r.returncode == 2 and r.stderr == "" and r.stdout == ""
    assert not (tmp_path / "out").exists()


def test_the_ladder_refuses_mpiexec(tmp_path):
    r = subprocess.run([sys.executable, "-m", "numgpt.ladder", f"--out-dir={tmp_path}/l"],
                       env=_env(OMPI_COMM_WORLD_RANK=0, OMPI_COMM_WORLD_SIZE=2),
                       capture_output=True, text=True, timeout=120)
    one_line_error(r, "without mpiexec")


def test_sample_refuses_mpiexec(tmp_path, repo):
    """Every rank would print its own samples (they once did, twice over)."""
    r = subprocess.run([sys.executable, os.path.join(repo, "sample.py"),
                        f"--out_dir={tmp_path}"],
                       env=_env(OMPI_COMM_WORLD_RANK=0, OMPI_COMM_WORLD_SIZE=2),
                       capture_output=True, text=True, timeout=120)
    one_line_error(r, "sample.py samples in one process; run it without mpiexec")


@pytest.mark.parametrize("B,N", [(12, 2), (7, 2), (5, 3), (64, 8)])
def test_the_ranks_take_every_row_once(B, N):
    world = distributed.World()
    world.size = N
    rows = [world.rows(B, rank=r) for r in range(N)]
    assert rows[0][0] == 0 and rows[-1][1] == B
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    assert all(b - a in (B // N, B // N + 1) for a, b in rows)


def test_threads_per_rank_never_exceed_the_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert [distributed.threads_per_rank(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # bound to a core
    assert distributed.threads_per_rank(2) == 1


@pytest.mark.parametrize("kernels", [False, True])
def test_rows_of_a_batch_draw_those_rows_of_its_dropout_masks(kernels):
    """BatchRows(rng, first): the same draws from rng as the whole batch, and the masks' rows
    first.. of the whole batch's; nested slices add their offsets."""
    if kernels:
        from numgpt.kernels.dropout import keep_mask as mask
    else:
        mask = keep_mask
    shape = (7, 3, 5, 5)
    rng_whole, rng = np.random.default_rng(3), np.random.default_rng(3)
    whole = mask(rng_whole, shape, 0.3)
    part = mask(BatchRows(rng, 2), (4,) + shape[1:], 0.3)
    np.testing.assert_array_equal(part, whole[2:6])
    assert not whole[2:6].all() and whole[2:6].any()
    assert rng.bit_generator.state == rng_whole.bit_generator.state
    nested = mask(BatchRows(BatchRows(np.random.default_rng(3), 2), 3), (2,) + shape[1:], 0.3)
    np.testing.assert_array_equal(nested, whole[5:7])


@pytest.mark.parametrize("kernels", [False, True])
def test_sharded_dropout_step_equals_the_whole_batch(kernels):
    """With dropout, the two-thread step trains the batch with the whole batch's masks: the
    same loss and gradients as one pass (float64), and the generator ends where one pass
    leaves it."""
    from numgpt.parallel import ShardedStep
    cfg = numgpt.get_config("preln", vocab_size=20, batch_size=5, dropout=0.3, zero_head=False,
                            kernels=kernels)
    m = numgpt.GPT(cfg, seed=1, dtype=np.float64)
    x = np.random.default_rng(0).integers(0, 20, (5, cfg.block_size))
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    loss, grads = m.loss_and_grads(x, x, rng=r1)
    with ShardedStep(m, 2) as step:
        loss2, grads2 = step(x, x, rng=r2)
    assert abs(loss - loss2) < 1e-12
    for k in grads:
        np.testing.assert_allclose(grads2[k], grads[k], rtol=1e-10, atol=1e-13, err_msg=k)
    assert r1.bit_generator.state == r2.bit_generator.state


def test_mpi_timeout_must_be_seconds(monkeypatch):
    from numgpt import env
    monkeypatch.delenv("NUMGPT_MPI_TIMEOUT", raising=False)
    assert env.seconds("NUMGPT_MPI_TIMEOUT") == 300
    monkeypatch.setenv("NUMGPT_MPI_TIMEOUT", "2.5")
    assert env.seconds("NUMGPT_MPI_TIMEOUT") == 2.5
    for bad in ("0", "-1", "nan", "inf", "soon"):
        monkeypatch.setenv("NUMGPT_MPI_TIMEOUT", bad)
        with pytest.raises(env.EnvError, match="NUMGPT_MPI_TIMEOUT"):
            env.check_all()
