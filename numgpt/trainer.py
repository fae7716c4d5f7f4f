"""The training loop behind train.py: batches, AdamW steps, evals, logs, plots, checkpoints, resume."""
import dataclasses
import errno
import json
import math
import os
import re
import signal
import stat
import sys
import tempfile
import time

import numpy as np

from . import budget, make_optimizer
from ._threads import training_starts
from .checkpoint import CheckpointError, checkpoint_bytes, read_model_checkpoint, save_checkpoint
from .config import Config, format_duration
from .data import Dataset, atomic_write_bytes
from .distributed import (SINGLE, allreduce_bytes, check_batch, get_world, shard_config,
                          train_step)
from .resources import check_memory
from .generate import generate
from .model import GPT
from .optim import clip_grad_norm, get_lr
from .parallel import FUSED, candidates, planned_step

CKPT = "ckpt.npz"
LOG = "log.jsonl"
PLOT = "loss.png"


class TrainingError(Exception):
    """Training cannot go on; the message is one line for the user."""


STEP0_EVAL_ITERS = 10  # the untrained model's loss needs few batches; the first step comes sooner
WHOLE_VAL_TOKENS = 4096  # tokens a batch at least in the last evaluation (whole_val_rows)


def estimate_loss(model, ds, cfg, step, world=SINGLE, whole_val=False):
    """Mean loss over eval_iters batches of each split (at most STEP0_EVAL_ITERS at step 0), from a
    generator seeded by (seed, step) so evaluation never disturbs the training stream and a resumed
    run evaluates the same batches. With whole_val (the run's last evaluation), the validation
    loss is over the whole validation text instead (whole_text_loss): the same number however the
    batches fall. Under MPI every rank draws every batch and evaluates every world.size-th; an
    Allreduce of the losses (the others' slots 0) gathers them, so the mean is the single
    process's, bit for bit."""
    out = {}
    n = cfg.eval_iters if step > 0 else min(cfg.eval_iters, STEP0_EVAL_ITERS)
    for split in ("train", "val"):
        if split == "val" and whole_val:
            out[split] = whole_text_loss(model, ds.val, cfg.block_size, whole_val_rows(cfg), world)
            continue
        rng = np.random.default_rng([cfg.seed, step, 0 if split == "train" else 1])
        losses = np.zeros(n)
        for i in range(n):
            batch = ds.get_batch(split, cfg.batch_size, cfg.block_size, rng)
            if i % world.size == world.rank:
                losses[i] = model.loss(*batch)
        out[split] = float(np.mean(world.allreduce(losses, "the evaluation")))
    return out


def text_windows(ids, block_size):
    """(x, y): ids cut into consecutive windows of block_size, and the ids one place on (the
    targets); the tail too short for a window is left out. Every id but the first is a target
    once."""
    ids = np.asarray(ids, dtype=np.int64)
    n = (len(ids) - 1) // block_size
    x = ids[:n * block_size].reshape(n, block_size)
    y = ids[1:n * block_size + 1].reshape(n, block_size)
    return x, y


def whole_val_rows(cfg):
    """Windows a batch of whole_text_loss in the last evaluation: cfg's batch, or more rows when
    that holds fewer than WHOLE_VAL_TOKENS tokens (a small model's batches cost mostly calls)."""
    return max(cfg.batch_size, -(-WHOLE_VAL_TOKENS // cfg.block_size))


def whole_text_loss(model, ids, block_size, rows, world=SINGLE):
    """Mean loss of model's predictions of every character of ids but the first (text_windows,
    `rows` windows a batch; all windows are one size, so the mean of the batches' means weighted
    by their rows is the mean over the characters). Under MPI each rank takes every
    world.size-th batch, as estimate_loss does."""
    x, y = text_windows(ids, block_size)
    if len(x) == 0:
        raise ValueError(f"the text is shorter than one block ({block_size} + 1 characters)")
    starts = range(0, len(x), rows)
    totals = np.zeros(len(starts))
    for i, a in enumerate(starts):
        if i % world.size == world.rank:
            totals[i] = model.loss(x[a:a + rows], y[a:a + rows]) * len(x[a:a + rows])
    return float(np.sum(world.allreduce(totals, "the evaluation")) / len(x))


LOG_NUMBERS = ("train_loss", "val_loss", "time")  # every row's; "lr" is checked where present


def _log_row(line):
    """The row on one line of log.jsonl, with only its known fields, or None if it is damaged:
    the step a whole number >= 0, the losses, time (>= 0) and lr finite numbers (bools are not
    numbers here, nor are NaN and Infinity, which Python's json reads)."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError, digits past int's limit, deep nesting
        return None

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not isinstance(row, dict):
        return None
    step = row.get("step")
    if not (isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 2 ** 63):
        return None
    if not all(number(row.get(k)) for k in LOG_NUMBERS) or row["time"] < 0:
        return None
    if "lr" in row and not number(row["lr"]):
        return None
    return {k: row[k] for k in ("step", "train_loss", "val_loss", "lr", "time") if k in row}


def read_log(path):
    """The well-formed rows of log.jsonl (a damaged line is skipped, the rest kept)."""
    rows = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:  # a damaged line: log writes are atomic, so edited by hand
                row = _log_row(line) if line.strip() else None
                if row is not None:
                    rows.append(row)
    return rows


def write_log(path, rows):
    try:
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
    except OSError as e:
        raise TrainingError(f"could not write the log {path} ({e.strerror}); the checkpoint "
                            "beside it is intact") from None


def new_axes(figsize=(7, 4.5)):
    """A matplotlib figure and axes drawn without a display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=figsize, dpi=100)


def figure_png(fig, ax, title, ylabel):
    """Finish the axes and return the figure as PNG bytes (the figure is closed)."""
    import io

    import matplotlib.pyplot as plt
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig, ax, path, title, ylabel):
    """Finish the axes and write the PNG atomically (a temporary file renamed over the old one)."""
    atomic_write_bytes(path, figure_png(fig, ax, title, ylabel))


def loss_png(rows, title):
    """PNG bytes of train and val loss against step."""
    fig, ax = new_axes()
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["train_loss"] for r in rows], label="train", marker=".")
    ax.plot(steps, [r["val_loss"] for r in rows], label="val", marker=".")
    return figure_png(fig, ax, title, "cross-entropy loss (nats / character)")


def plot_losses(rows, path, title):
    """Train and val loss against step, written to path atomically."""
    atomic_write_bytes(path, loss_png(rows, title))


class _OutDirLock:
    """An exclusive lock on out_dir/.numgpt.lock for the run's lifetime, so two runs pointed at the
    same folder never write over each other's checkpoints. The kernel drops it when the process
    dies, kill -9 included, so a stale lock never blocks a later run.

    The lock file is opened without following a symbolic link (O_NOFOLLOW) and without blocking
    on a FIFO (O_NONBLOCK), and is used only when it is a regular file with no other hard link
    that is empty or holds "pid N": anything else (the user's file, a link to one, a device, a
    FIFO) is refused with a one-line error and left as it was."""

    NAME = ".numgpt.lock"

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, self.NAME)
        self.fd = None

    @property
    def held(self):
        return self.fd is not None

    def _refuse(self, what):
        raise TrainingError(f"the lock file {self.path} {what}; numgpt writes only its own files "
                            "in out_dir: remove it or choose another --out_dir")

    def _open(self, create):
        """The lock file's descriptor, or None when create is False and there is none."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | (os.O_CREAT if create else 0), 0o666)
        except OSError as e:
            if os.path.islink(self.path):  # O_NOFOLLOW: ELOOP (a dangling link is not created)
                self._refuse("is a symbolic link")
            if not create and e.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise TrainingError(f"cannot open the lock file {self.path} ({e.strerror})") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            os.close(fd)
            self._refuse("is not a regular file" if not stat.S_ISREG(st.st_mode)
                         else "has other hard links")
        return fd

    def acquire(self, create):
        """Take the lock; with create=False only when the lock file already exists (so a refused
        run creates nothing). Refuses when another run holds it or the file is not numgpt's."""
        import fcntl
        fd = self._open(create)
        if fd is None:
            return self
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                held = os.pread(fd, 64, 0).strip()
                owner = held.decode() if re.fullmatch(rb"pid \d+", held) else "another process"
                raise TrainingError(f"another training run ({owner}) is using {self.out_dir}; "
                                    "wait for it or choose another --out_dir") from None
            held = os.pread(fd, 4096, 0).strip()
            if held and not re.fullmatch(rb"pid \d+", held):
                self._refuse("holds something else than numgpt's lock")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _StopFlag:
    """SIGINT (Ctrl-C), SIGTERM (kill, a job scheduler) and SIGHUP (the terminal closed) set a flag
    that the loop checks between steps, so the run saves a consistent checkpoint and exits cleanly."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                    if hasattr(signal, name))  # SIGHUP: the terminal was closed

    def __init__(self):
        self.stop = False
        self.first = None
        self._old = {}

    def __enter__(self):
        def handler(signum, frame):
            now = time.monotonic()
            # a second Ctrl-C gives up at once (the checkpoint on disk stays whole); one that
            # comes within a second of the first is the same keypress delivered twice (e.g. by
            # `timeout` or a wrapper forwarding it to its child) and is ignored
            if self.stop and now - self.first > 1.0:
                raise KeyboardInterrupt
            if not self.stop:
                self.stop, self.first = True, now
        try:
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# what a resumed run may change: its length, evaluations, learning-rate schedule, clipping and
# whether it runs on the kernels (the model, batch, data and seed must be the checkpoint's)
RESUME_MAY_CHANGE = ("max_iters", "max_time", "eval_interval", "eval_iters", "learning_rate",
                     "min_lr", "warmup_iters", "decay_lr", "grad_clip", "kernels")


def _config_mismatch(a: Config, b: Config, allowed=RESUME_MAY_CHANGE):
    da, db = a.to_dict(), b.to_dict()
    return [k for k in da if da[k] != db[k] and k not in allowed]


def _changed_settings(saved, cfg):
    """', with learning_rate 0.001 (was 0.002), ...' for what a resumed run changed (its length
    is said apart), or ''."""
    if saved is None:
        return ""
    da, db = saved.to_dict(), cfg.to_dict()
    changed = [f"{k} {db[k]} (was {da[k]})" for k in RESUME_MAY_CHANGE
               if k not in ("max_iters", "max_time") and da[k] != db[k]]
    return f", with {', '.join(changed)}" if changed else ""


# the temporary files atomic_write_bytes makes for our outputs (tempfile.mkstemp names: 8 of
# a-z, 0-9, _), and the write probe of train(); a kill -9 at the wrong moment leaves them behind
_STALE_TEMP = re.compile(r"\.(?:ckpt\.npz|log\.jsonl|loss\.png)\.[a-z0-9_]{8}\.tmp"
                         r"|\.numgpt-write-test-[a-z0-9_]{8}")


def remove_stale_temp_files(out_dir):
    """Delete what a killed run left of its temporary files in out_dir: regular files (never a
    link or anything else) whose names follow our own temporary naming. Call it holding the lock."""
    for name in os.listdir(out_dir):
        if _STALE_TEMP.fullmatch(name):
            path = os.path.join(out_dir, name)
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):
                    os.unlink(path)
            except OSError:
                pass  # gone already, or not ours to remove: left as it is


def _file_identity(path):
    """(inode, size, mtime) of path without following a link, None when there is none; an atomic
    rewrite gives a new inode, so a changed identity means the file was replaced."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _check_fresh_out_dir(out_dir):
    """Refuse a new run in an out_dir that holds a checkpoint, a log or a plot (a symbolic link
    by such a name counts too, dangling or not: the user's, never written through)."""
    ckpt_path, log_path, plot_path = (os.path.join(out_dir, n) for n in (CKPT, LOG, PLOT))
    if os.path.lexists(ckpt_path):
        raise TrainingError(f"{out_dir} already holds a checkpoint; pass --resume to continue it "
                            "or choose another --out_dir")
    kept = [os.path.basename(p) for p in (log_path, plot_path)
            if os.path.lexists(p) and (p != log_path or os.path.islink(p)
                                       or os.path.getsize(p) > 0)]
    if kept:  # not ours to overwrite: another run's results, or the user's own files
        raise TrainingError(f"{out_dir} already holds {' and '.join(kept)} (but no checkpoint); "
                            "move them away or choose another --out_dir")


class _Start:
    """Where a run starts: a new model at step 0, or the state read back from a checkpoint."""

    def __init__(self, cfg, ds, out_dir, resume):
        self.model = GPT(cfg, seed=cfg.seed, dtype=np.float32)
        self.opt = make_optimizer(self.model, cfg)
        self.rng = np.random.default_rng(cfg.seed)
        self.step, self.best_val, self.rows = 0, math.inf, []
        self.ckpt_path = os.path.join(out_dir, CKPT)
        self.identity = None
        self.resume = resume
        self.train_step = None  # the step (numgpt.parallel.STEPS) a resumed run trained with
        self.ranks = None  # on how many MPI ranks (numgpt/distributed.py) it trained
        self.saved_cfg = None  # the config in the checkpoint a resumed run continues
        if resume:
            self._resume(cfg, ds, out_dir)
        else:
            _check_fresh_out_dir(out_dir)

    def _resume(self, cfg, ds, out_dir):
        ckpt_path = self.ckpt_path
        self.identity = _file_identity(ckpt_path)
        saved_cfg, chars, params, opt_state, meta = read_model_checkpoint(ckpt_path)
        self.saved_cfg = saved_cfg
        src = meta.get("data")
        hint = f" (--data={src})" if isinstance(src, str) and src.startswith("/") else ""
        if chars != ds.vocab.chars:
            raise TrainingError(f"--resume: the checkpoint in {out_dir} has another vocabulary "
                                f"than this data; resume with the data it was trained on{hint}")
        saved_sha, sha = meta.get("data_sha256"), ds.meta.get("sha256")
        if isinstance(saved_sha, str) and isinstance(sha, str) and saved_sha != sha:
            todo = (f"resume with --data={src}" if hint else "resume with the data it was "
                    f"trained on ({src})")
            raise TrainingError(f"--resume: the checkpoint was trained on other data than "
                                f"{ds.meta.get('source')} (sha256 {saved_sha[:8]}, not "
                                f"{sha[:8]}); {todo}")
        bad = _config_mismatch(saved_cfg, cfg)
        if bad:
            raise TrainingError(f"--resume: the checkpoint in {out_dir} was trained with other "
                                f"settings of {', '.join(bad)}; drop those overrides or use a new "
                                "--out_dir")
        try:
            self.model.set_params(params)
            self.opt = make_optimizer(self.model, cfg)
            self.opt.load_state_dict(opt_state)
            self.rng.bit_generator.state = meta["rng_state"]
            self.best_val = float(meta.get("best_val", math.inf))
        except (ValueError, KeyError, TypeError, OverflowError) as e:
            raise CheckpointError(f"{ckpt_path} holds a broken optimizer or random-generator "
                                  f"state ({type(e).__name__}: {e})") from None
        self.step = meta["step"]
        name = meta.get("train_step")
        self.train_step = name if isinstance(name, str) else None
        self.ranks = meta.get("ranks", 1)
        # kept in memory only: the log on disk is rewritten with the first new row
        self.rows = [r for r in read_log(os.path.join(out_dir, LOG)) if r["step"] <= self.step]

    def changed(self):
        """True when the checkpoint read at the start was replaced since (by another run that
        held out_dir while this one read it)."""
        return self.resume and _file_identity(self.ckpt_path) != self.identity

    def shared(self):
        """What another MPI rank needs to start where this one does."""
        return {"params": self.model.params, "opt": self.opt.state_dict(),
                "rng": self.rng.bit_generator.state, "step": self.step,
                "best_val": self.best_val, "train_step": self.train_step, "ranks": self.ranks,
                "resume": self.resume}

    @classmethod
    def received(cls, cfg, state):
        """The start rank 0 sent (shared()): the other ranks read no file."""
        self = cls.__new__(cls)
        self.model = GPT(cfg, dtype=np.float32, params=state["params"])
        self.opt = make_optimizer(self.model, cfg)
        self.opt.load_state_dict(state["opt"])
        self.rng = np.random.default_rng(cfg.seed)
        self.rng.bit_generator.state = state["rng"]
        self.step, self.best_val, self.rows = state["step"], state["best_val"], []
        self.train_step, self.ranks = state["train_step"], state["ranks"]
        self.resume = state["resume"]
        self.ckpt_path, self.identity = None, None
        return self


def resumed_schedule(cfg, saved, out_dir, max_time_given=False):
    """The config a resumed run trains with. A run with a time budget (cfg.max_time, i.e. no
    --max_iters given) continues the schedule in its checkpoint: the max_iters its budget fixed
    when it started (or the one it was given), and its eval_interval unless one is given now.
    A --max_iters given now (cfg.max_time == 0) replaces them; a --max_time given now
    (max_time_given) must be the run's own."""
    if not cfg.max_time:
        return cfg
    if max_time_given and saved.max_time != cfg.max_time:
        had = (f"has a time budget of {format_duration(saved.max_time)}, which fixed its length "
               f"at {saved.max_iters:,} steps when it started" if saved.max_time else
               f"was started for {saved.max_iters:,} steps, without a time budget")
        raise TrainingError(f"--resume: the run in {out_dir} {had}; drop --max_time, or give "
                            "--max_iters to change its length")
    return cfg.replace(max_iters=saved.max_iters, max_time=saved.max_time,
                       eval_interval=cfg.eval_interval or saved.eval_interval)


def _run_config(cfg, start, out_dir, max_time_given):
    """The config the run trains with: cfg, or a resumed run's schedule (resumed_schedule), which
    must not end before the step it resumes from."""
    if not start.resume:
        return cfg
    cfg = resumed_schedule(cfg, start.saved_cfg, out_dir, max_time_given)
    if cfg.max_iters < start.step:
        raise TrainingError(f"--resume: the run in {out_dir} is at step {start.step:,}, past "
                            f"--max_iters={cfg.max_iters:,}; give a larger --max_iters to train "
                            "it further")
    return cfg


def _make_out_dir(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".numgpt-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise TrainingError(f"cannot write to out_dir {out_dir}: it is a file, not a "
                                "folder; give another --out_dir") from None
        raise TrainingError(f"cannot write to out_dir {out_dir}: {e.strerror}") from None


def train(cfg: Config, ds: Dataset, out_dir, resume=False, stop_at=None, quiet=False,
          sample_chars=500, progress=True, world=None, clock=time.monotonic,
          max_time_given=False):
    """Train cfg on ds, writing ckpt.npz, log.jsonl and loss.png into out_dir.

    resume: continue from out_dir/ckpt.npz (its model config, vocabulary and data must match).
    stop_at: stop (with a checkpoint) after this many steps, as if interrupted; used by tests.
    world: numgpt.distributed's World (default: this process's, get_world()). Under MPI rank 0
    does all that follows and sends the start to the other ranks, which touch no file.
    cfg.max_time: a time budget in seconds, counted from this call (numgpt/budget.py); the clock
    that measures it is `clock` (tests pass one of their own). A resumed run keeps the length
    in its checkpoint (resumed_schedule); max_time_given: cfg.max_time was asked for (train.py's
    --max_time), so it must be the run's own.
    Every check that can refuse the run (data, memory, another run in out_dir, the checkpoint
    to resume) comes before out_dir or anything in it is created, so a refused run leaves nothing;
    a budget that holds no training, known only once the step is measured, removes what it made.
    Returns dict with the final losses and paths.
    """
    world = get_world() if world is None else world
    t_begin = clock()
    if not os.fspath(out_dir):
        raise TrainingError("--out_dir is empty; give the folder for the run, e.g. --out_dir=out")
    ds.check_block(cfg.block_size)
    cfg = cfg.replace(vocab_size=len(ds.vocab))
    check_batch(world, cfg.batch_size)
    check_memory(cfg, "train")
    if world.size > 1:
        _check_same_run(world, cfg)
    if not world.is_root:  # the start comes from rank 0; no file is read or written here
        training_starts()
        sent = world.bcast(None, "the start")
        cfg, start = sent["config"], _Start.received(sent["config"], sent["start"])
        return _train(cfg, ds, out_dir, start, stop_at, True, sample_chars, False, world, clock,
                      t_begin)
    made_dir = not os.path.lexists(out_dir)
    with _OutDirLock(out_dir) as lock:
        lock.acquire(create=False)  # when out_dir already has a lock file: nothing is created
        made_lock = not lock.held
        start = _Start(cfg, ds, out_dir, resume)
        run_cfg = _run_config(cfg, start, out_dir, max_time_given)
        if not lock.held:
            _make_out_dir(out_dir)
            lock.acquire(create=True)
            if not resume:
                _check_fresh_out_dir(out_dir)  # again, now that no other run can start here
            elif start.changed():
                start = _Start(cfg, ds, out_dir, resume)
                run_cfg = _run_config(cfg, start, out_dir, max_time_given)
        cfg = run_cfg
        remove_stale_temp_files(out_dir)
        training_starts()
        if world.size > 1:  # with the config: a resumed run's schedule is rank 0's to read
            world.bcast({"config": cfg, "start": start.shared()}, "the start")
        try:
            return _train(cfg, ds, out_dir, start, stop_at, quiet, sample_chars, progress,
                          world, clock, t_begin)
        except budget.BudgetError:  # before anything was written: leave out_dir as it was
            _remove_made(lock.path if made_lock else None, out_dir if made_dir else None)
            raise


def _remove_made(lock_file, folder):
    """Remove the lock file and the (then empty) out_dir that a refused run made, where given."""
    for remove, path in ((os.unlink, lock_file), (os.rmdir, folder)):
        if path is not None:
            try:
                remove(path)
            except OSError:  # gone, or no longer empty: left as it is
                pass


def take_step(ds, cfg, step_fn, opt, rng, lr):
    """One training step: a batch drawn from rng, loss and gradients (step_fn, which draws its
    dropout masks from rng too), gradient clipping, then AdamW at lr, which is left out when the
    loss or the gradient norm is not finite. Returns (loss, gradient norm before clipping)."""
    x, y = ds.get_batch("train", cfg.batch_size, cfg.block_size, rng)
    loss, grads = step_fn(x, y, train=True, rng=rng)
    gnorm = clip_grad_norm(grads, cfg.grad_clip)
    if math.isfinite(loss) and math.isfinite(gnorm):
        opt.step(grads, lr)
    return loss, gnorm


def measure_run_costs(cfg, ds, model, opt, step_fn, meta, clock, out_dir=None, sample_chars=0,
                      seconds=budget.MEASURE_SECONDS, world=SINGLE):
    """budget.Costs of training cfg here: training steps (take_step with step_fn), an eval
    batch (model.loss, as estimate_loss), a checkpoint (written to a probe file in out_dir and
    fsynced; only serialised when out_dir is None), a loss plot drawn, a sample of
    sample_chars characters (0: none), and from the eval batch the last evaluation's extra
    (last_val_seconds).
    The steps run on model and opt, whose state is put back as it was, with batches and dropout
    masks from a generator of their own (a run's own stream is untouched).
    Under MPI (world) every rank takes as many steps as rank 0 times, each ending in the
    gradients' Allreduce; rank 0 alone measures the rest and returns the costs, the others None."""
    rng = np.random.default_rng([cfg.seed, 0xB0D6E7])

    def step_once():
        take_step(ds, cfg, step_fn, opt, rng, cfg.learning_rate)

    def eval_once():
        model.loss(*ds.get_batch("val", cfg.batch_size, cfg.block_size, rng))

    def save_once():
        data = checkpoint_bytes(model.params, opt.state_dict(), meta)
        if out_dir is not None:
            budget.write_probe(out_dir, data)

    def plot_once():
        loss_png([{"step": i, "train_loss": 1.0, "val_loss": 1.0} for i in range(12)], "")

    def sample_once():
        generate(model, np.zeros((1, 1), dtype=np.int64), sample_chars, rng=rng)

    def agree(more):  # rank 0's answer, on every rank
        return more if world.size == 1 else world.bcast(more, "the budget's measured steps")
    with budget.restored_after(model, opt):
        if not world.is_root:
            budget.timed_mean(step_once, clock, budget.MIN_REPS, seconds, agree=agree,
                              warm_seconds=budget.WARM_SECONDS)
            return None
        try:
            costs = budget.measure_costs(step_once, eval_once, save_once, clock, plot_once,
                                         sample_once if sample_chars else None, seconds=seconds,
                                         agree=agree)
        except OSError as e:
            raise TrainingError(f"cannot write to out_dir {out_dir} ({e.strerror})") from None
    return dataclasses.replace(costs, last_val=last_val_seconds(cfg, ds, costs.eval_batch))


def last_val_seconds(cfg, ds, eval_batch):
    """budget.Costs.last_val: the whole validation text at an eval batch's cost per token, less
    the eval_iters batches that an evaluation's validation half otherwise takes."""
    windows = (len(ds.val) - 1) // cfg.block_size
    return eval_batch * (windows / cfg.batch_size - cfg.eval_iters)


def fix_budget(cfg, ds, out_dir, model, opt, step_fn, spent, clock, meta, sample_chars,
               world=SINGLE):
    """(max_iters, line) for a new run with a time budget (budget.plan), from the costs measured
    here (measure_run_costs); spent() is the budget's time gone so far. Under MPI rank 0 plans
    and sends the plan, or the BudgetError's line, to the others."""
    costs = measure_run_costs(cfg, ds, model, opt, step_fn, meta, clock, out_dir, sample_chars,
                              world=world)
    if world.size == 1:
        return budget.plan(cfg, costs, spent(), min(cfg.eval_iters, STEP0_EVAL_ITERS))
    planned = None
    if world.is_root:  # each rank evaluates every world.size-th batch (estimate_loss)
        costs = dataclasses.replace(costs, eval_batch=costs.eval_batch / world.size,
                                    last_val=costs.last_val / world.size)
        try:
            planned = budget.plan(cfg, costs, spent(), min(cfg.eval_iters, STEP0_EVAL_ITERS))
        except budget.BudgetError as e:
            planned = str(e)
    planned = world.bcast(planned, "the budget's plan")
    if isinstance(planned, str):
        raise budget.BudgetError(planned)
    return planned


def _check_same_run(world, cfg):
    """Under MPI: refuse to start when a rank runs other options or versions than rank 0."""
    from importlib.metadata import version

    from . import __version__
    world.check_same({"numgpt": __version__, "NumPy": np.__version__, "numba": version("numba"),
                      "config": cfg.to_dict()})


def _train(cfg, ds, out_dir, start, stop_at, quiet, sample_chars, progress, world=SINGLE,
           clock=time.monotonic, t_begin=None):
    t_begin = clock() if t_begin is None else t_begin
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    ckpt_path = os.path.join(out_dir, CKPT)
    log_path = os.path.join(out_dir, LOG)
    plot_path = os.path.join(out_dir, PLOT)

    # a resumed run keeps its step, unless it now runs on another number of ranks
    prefer = start.train_step if start.ranks == world.size else None
    compiling = 0.0  # seconds of the kernels' first compile: not counted in a time budget
    if cfg.kernels:
        from numgpt import kernels
        share = shard_config(world, cfg)  # the rows each rank computes (all of them in one)
        plan = planned_step(share, prefer=prefer)
        fused = plan in FUSED or (plan is None and "fused" in candidates(share))
        cold, t0 = not kernels.cache_is_warm(fused), clock()
        kernels.warmup("float32", say=None if not quiet else (lambda msg: None), fused=fused)
        compiling = clock() - t0 if cold else 0.0
    model, opt, rng = start.model, start.opt, start.rng
    step, best_val, rows = start.step, start.best_val, start.rows
    saved = start.resume  # a checkpoint of this run is on disk
    if start.resume:
        fixed = (f" (fixed by its time budget of {format_duration(cfg.max_time)})"
                 if cfg.max_time else "")
        say(f"resuming from step {step:,} of {cfg.max_iters:,}{fixed} in {out_dir}"
            f"{_changed_settings(getattr(start, 'saved_cfg', None), cfg)}")

    def kept():
        return (f"the last good checkpoint {ckpt_path} is kept" if saved
                else "no checkpoint was written")

    def checkpoint_meta(at_step):
        return {"step": at_step, "config": cfg.to_dict(), "vocab": ds.vocab.chars,
                "rng_state": rng.bit_generator.state, "best_val": best_val,
                "data": ds.meta.get("source"), "data_sha256": ds.meta.get("sha256"),
                "train_step": step_name, "ranks": world.size}

    def save(at_step):
        nonlocal saved
        meta = checkpoint_meta(at_step)
        bad = [k for k, v in model.params.items() if not np.isfinite(v).all()]
        if bad:
            raise TrainingError(f"parameter {bad[0]} is not finite at step {at_step}; not saving "
                                f"it, {kept()}; try a lower --learning_rate or --grad_clip=1")
        try:
            save_checkpoint(ckpt_path, model.params, opt.state_dict(), meta)
        except OSError as e:
            raise TrainingError(f"could not write the checkpoint at step {at_step} "
                                f"({e.strerror}); " + ("the previous checkpoint is intact" if saved
                                                      else "no checkpoint was written")) from None
        saved = True

    def evaluate(at_step, lr, last=False):
        nonlocal best_val
        losses = estimate_loss(model, ds, cfg, at_step, world, whole_val=last)
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainingError(f"the evaluated loss became {losses['train']} (train) / "
                                f"{losses['val']} (val) at step {at_step}; {kept()}; try a lower "
                                "--learning_rate or --grad_clip=1")
        best_val = min(best_val, losses["val"])
        if not world.is_root:  # rank 0 writes
            return losses
        save(at_step)
        rows[:] = [r for r in rows if r["step"] < at_step]  # a resumed run evaluates its step again
        rows.append({"step": at_step, "train_loss": losses["train"], "val_loss": losses["val"],
                     "lr": lr, "time": round(time.time() - t_start + t_prev, 3)})
        write_log(log_path, rows)
        if len(rows) > 1:  # a curve needs two points (and matplotlib's import waits till then)
            try:
                plot_losses(rows, plot_path, f"numgpt: {cfg.n_layer} layers, C{cfg.n_embd}, "
                                             f"T{cfg.block_size}, B{cfg.batch_size}")
            except OSError as e:
                raise TrainingError(f"could not write the plot {plot_path} ({e.strerror}); the "
                                    "checkpoint beside it is intact") from None
        return losses

    say(f"model: {model.num_params():,} parameters; training on {len(ds.train):,} characters, "
        f"vocabulary {len(ds.vocab)}; writing to {out_dir}")
    if world.size > 1:
        say(f"data parallel: {world.describe()}; each takes {cfg.batch_size // world.size}"
            f"{'+' * (cfg.batch_size % world.size > 0)} rows of a batch of {cfg.batch_size}; "
            f"one Allreduce of {allreduce_bytes(model) / 1e6:.3g} MB a step")
    t_prev = rows[-1]["time"] if rows else 0.0
    t_start = time.time()
    tokens_per_step = cfg.batch_size * cfg.block_size
    bar = None
    interrupted = False
    losses = None
    step_fn, close_step, step_name = train_step(  # the fastest here, measured or cached
        world, model, cfg, prefer=prefer,
        say=None if quiet else (lambda msg: (bar.write(msg) if bar else say(msg))))
    try:
        if cfg.max_time and not start.resume:  # a new run with a time budget: fix its length
            n, line = fix_budget(cfg, ds, out_dir, model, opt, step_fn,
                                 lambda: clock() - t_begin - compiling, clock, checkpoint_meta(0),
                                 0 if quiet else sample_chars, world)
            cfg = cfg.replace(max_iters=n)
            say(line)
        if progress and not quiet:
            from tqdm import tqdm
            bar = tqdm(total=cfg.max_iters, initial=step, unit="step", dynamic_ncols=True,
                       file=sys.stderr, mininterval=0.5)
        t_last, tok_rate = None, 0.0
        with _StopFlag() as flag:
            while step < cfg.max_iters:
                lr = get_lr(step, cfg)
                if step % cfg.eval_every == 0:
                    losses = evaluate(step, lr)
                    msg = f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f}"
                    (bar.write(msg) if bar else say(msg))
                    t_last = None  # the speed shown is the steps' own, evaluations left out
                    if bar:
                        bar.unpause()
                if world.any(flag.stop, "the stop vote") or (stop_at is not None
                                                             and step >= stop_at):
                    interrupted = True
                    break
                if t_last is None:
                    t_last = time.perf_counter()
                loss, gnorm = take_step(ds, cfg, step_fn, opt, rng, lr)
                if not (math.isfinite(loss) and math.isfinite(gnorm)):
                    raise TrainingError(f"the loss became {loss} (gradient norm {gnorm}) at step "
                                        f"{step}; {kept()}; try a lower --learning_rate or "
                                        "--grad_clip=1")
                step += 1
                now = time.perf_counter()
                rate = tokens_per_step / max(now - t_last, 1e-9)
                t_last = now
                tok_rate = rate if tok_rate == 0 else 0.9 * tok_rate + 0.1 * rate
                if bar:
                    bar.set_postfix_str(f"loss {loss:.4f}, {tok_rate:,.0f} tok/s", refresh=False)
                    bar.update(1)
            if interrupted:
                if step % cfg.eval_every != 0 and world.is_root:
                    save(step)
                if bar:
                    bar.close()
                say(f"stopped at step {step}; checkpoint saved to {ckpt_path}; continue with --resume")
            else:
                losses = evaluate(step, get_lr(step, cfg), last=True)
                if bar:
                    bar.close()
                say(f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f} (the whole "
                    "validation text)")
    finally:
        close_step()
        if bar:
            bar.close()
    elapsed = time.time() - t_start
    if losses is None:  # a resumed run stopped before it evaluated: the last losses logged
        losses = ({"train": rows[-1]["train_loss"], "val": rows[-1]["val_loss"]} if rows
                  else {"train": math.nan, "val": math.nan})
    result = {"step": step, "max_iters": cfg.max_iters, "train_loss": losses["train"],
              "val_loss": losses["val"],
              "seconds": elapsed, "checkpoint": ckpt_path, "log": log_path, "plot": plot_path,
              "interrupted": interrupted}
    if not interrupted and sample_chars and not quiet:
        say(f"done in {elapsed / 60:.1f} min; loss curve: {plot_path}\n--- a sample ---")
        prompt = np.array([[ds.vocab.stoi.get("\n", 0)]])
        out = generate(model, prompt, sample_chars, rng=np.random.default_rng(cfg.seed))
        say(ds.vocab.decode(out[0, 1:]))
    return result
