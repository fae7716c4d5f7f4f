"""Training to a time budget (python train.py --max_time=10m): the number of steps that fits.

A budgeted run fixes its number of steps (max_iters) once, before its first step, from what a
step, an evaluation and a checkpoint cost on this machine, measured then (measure_costs):

    step        one training step as the loop takes it: a batch drawn, forward and backward with
                the chosen step (numgpt/parallel.py), gradient clipping and AdamW
    eval batch  one batch drawn and its loss, as estimate_loss takes it (an evaluation is
                2 x eval_iters of them)
    save        one checkpoint serialised, written and fsynced (to a probe file in out_dir)
    plot        the loss curve drawn (every evaluation after step 0 redraws it)
    last val    what the last evaluation's validation half takes beyond eval_iters batches (it
                reads the whole validation text: trainer.whole_text_loss), from the eval batch's
                cost per token
    sample      the sample printed at the end

Steps and eval batches are timed after untimed calls for WARM_SECONDS (at least one: a first call
pays for first touches of memory, and a process's first second of steps often runs slower than its
steady pace), for at least MIN_REPS calls and about MEASURE_SECONDS, and the mean is taken (a run's
steps include their slow ones too), each call counted at most STALL_CAP times the median (a single
stall, as seen just after a compile, would otherwise stretch the estimate for the whole run;
docs/benchmarks.md); the others once (the plot after an untimed first one, which imports
matplotlib). The trainer runs the steps on the run's own model and optimizer and puts their state
back bit for bit (restored_after), with batches and dropout masks from a generator of their own, so
the run that follows is exactly the run of max_iters=N: the schedule (warmup, cosine decay to
max_iters) is fixed before it starts.

steps_that_fit then takes the largest N for which the steps, the evaluations (step 0's, one every
eval_every steps and the last, with the whole validation text) and their checkpoints fit in the
time left: the budget less what the run has spent since it started (the step choice and this
measurement), less the sample, and less RESERVE of the budget, kept for what is not measured
(Python's start, the log written at each evaluation, and the machine's speed moving while it
trains: on a shared machine a whole run can step slower or faster than its first seconds
measured). RESERVE's value comes from budgeted runs (docs/benchmarks.md). The kernels' first
compile is not counted, nor is preparing the data, which come before.
"""
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from .config import EVALS_PER_RUN, ConfigError, format_duration

MEASURE_SECONDS = 2.0  # about this long is spent timing steps, half that eval batches (more
                       # when MIN_REPS of them take longer)
WARM_SECONDS = 0.5  # of untimed steps first (at least one), a quarter of that of eval batches
MIN_REPS = 3  # timed steps at least (after the untimed ones)
MIN_EVAL_REPS = 2
MAX_REPS = 100
RESERVE = 0.10  # of the budget, not planned for
STALL_CAP = 4.0  # a timed call counts at most this many times the median call


class BudgetError(ConfigError):
    """The budget cannot hold a run of this config here; the message is one line for the user."""


@dataclass
class Costs:
    """Seconds that one of each costs, measured on this machine."""
    step: float
    eval_batch: float
    save: float
    plot: float = 0.0
    sample: float = 0.0
    last_val: float = 0.0  # may be < 0: a large batch's eval_iters can outweigh the whole text


def timed_mean(fn, clock, min_reps, seconds, max_reps=MAX_REPS, agree=None, warm_seconds=0.0):
    """Mean seconds of a call of fn(), after untimed calls for warm_seconds (at least one): at least
    min_reps timed calls, then more until `seconds` have been spent on them or max_reps were made;
    each call counted at most STALL_CAP times the median. agree(more), where given, turns this
    process's answer to "one more call?" into the one every process takes (under MPI each step is a
    collective: every rank must make as many calls as rank 0)."""
    agree = agree or (lambda more: more)
    t_warm, warm = clock(), True
    while warm:
        fn()
        warm = agree(clock() - t_warm < warm_seconds)
    times = []
    while agree(len(times) < min_reps or (sum(times) < seconds and len(times) < max_reps)):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    # a one-off stall among a hundred calls would weigh as if every step of the run paid its
    # share: each call counts at most STALL_CAP times the median (slow calls that recur, such as
    # every other one at three times the pace, still count in full)
    cap = STALL_CAP * float(np.median(times))
    return float(np.minimum(times, cap).mean())


def timed_once(fn, clock):
    t0 = clock()
    fn()
    return clock() - t0


def measure_costs(step_once, eval_once, save_once, clock, plot_once=None, sample_once=None,
                  seconds=MEASURE_SECONDS, agree=None):
    """Costs from callables: step_once() takes one training step, eval_once() the loss of one
    batch, save_once() writes one checkpoint, plot_once() draws the loss curve and sample_once()
    the closing sample (the last two may be None: not done). About `seconds` go to timing steps,
    half that to eval batches (more when their least number of calls takes longer); agree: as
    timed_mean's, for the steps."""
    step = timed_mean(step_once, clock, MIN_REPS, seconds, agree=agree,
                      warm_seconds=WARM_SECONDS)
    eval_batch = timed_mean(eval_once, clock, MIN_EVAL_REPS, seconds / 2,
                            warm_seconds=WARM_SECONDS / 4)
    save = timed_once(save_once, clock)
    plot = 0.0
    if plot_once is not None:
        plot_once()
        plot = timed_once(plot_once, clock)
    sample = timed_once(sample_once, clock) if sample_once is not None else 0.0
    return Costs(step=step, eval_batch=eval_batch, save=save, plot=plot, sample=sample)


class restored_after:
    """with restored_after(model, opt): ... -- the parameters and AdamW's state (m, v, t) are put
    back as they were, in place (the same arrays, so the steps' and AdamW's bindings to them
    stay valid), whatever the block did to them."""

    def __init__(self, model, opt):
        self.model, self.opt = model, opt

    def __enter__(self):
        self.saved = ({k: v.copy() for k, v in self.model.params.items()},
                      {k: v.copy() for k, v in self.opt.m.items()},
                      {k: v.copy() for k, v in self.opt.v.items()}, self.opt.t)
        return self

    def __exit__(self, *exc):
        params, m, v, t = self.saved
        for now, before in ((self.model.params, params), (self.opt.m, m), (self.opt.v, v)):
            for k, a in before.items():
                np.copyto(now[k], a)
        self.opt.t = t
        self.saved = None


def write_probe(out_dir, data):
    """Write data to a new file in out_dir, fsync it and remove it: what saving a checkpoint of
    that size costs. The file's name is one that a later run removes if this one is killed
    meanwhile (trainer.remove_stale_temp_files)."""
    fd, path = tempfile.mkstemp(dir=out_dir, prefix=".numgpt-write-test-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.unlink(path)


def eval_seconds(costs, n_batches):
    """One evaluation of n_batches per split, with its checkpoint and plot."""
    return 2 * n_batches * costs.eval_batch + costs.save + costs.plot


def evaluations(cfg, n_steps):
    """How many evaluations a run of n_steps makes after step 0 (the last at step n_steps)."""
    every = cfg.replace(max_iters=max(1, n_steps)).eval_every
    return -(-n_steps // every)


def _evaluations_bound(cfg, n_steps):
    """At least evaluations(cfg, n_steps), and never fewer for a larger n_steps (so that the
    largest n_steps that fits can be bisected): with eval_interval=0 a run of n steps evaluates
    at most min(n, EVALS_PER_RUN) times after step 0."""
    if cfg.eval_interval:
        return evaluations(cfg, n_steps)
    return min(n_steps, EVALS_PER_RUN)


def run_seconds(cfg, costs, step0_batches, start=0):
    """Seconds that training cfg takes from step `start` (0: a new run; else a resumed one) to
    cfg.max_iters: its steps, its evaluations (step 0's of step0_batches per split, the others
    of eval_iters; a resumed run evaluates its first step again when it is due), each with its
    checkpoint and plot, and the sample at the end."""
    n, every = cfg.max_iters, cfg.eval_every
    evals = len(range(-(-start // every) * every, n, every)) + 1  # the due ones and the last
    seconds = ((n - start) * costs.step + evals * eval_seconds(costs, cfg.eval_iters)
               + costs.last_val + costs.sample)
    if start == 0:
        seconds += eval_seconds(costs, step0_batches) - eval_seconds(costs, cfg.eval_iters)
    return seconds


def steps_that_fit(cfg, costs, seconds, step0_batches):
    """The largest number of steps whose run (run_seconds) fits in `seconds`; 0 when none does."""
    def fits(n):
        return (n * costs.step + eval_seconds(costs, step0_batches)
                + _evaluations_bound(cfg, n) * eval_seconds(costs, cfg.eval_iters)
                + costs.last_val + costs.sample <= seconds)
    lo, hi = 0, max(1, int(seconds / max(costs.step, 1e-9)) + 1)  # fits(lo); not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo if fits(lo) else 0


def plan(cfg, costs, spent, step0_batches):
    """max_iters for cfg's time budget (cfg.max_time seconds, of which `spent` are gone), and the
    line that says so; BudgetError when not one step fits."""
    left = cfg.max_time * (1 - RESERVE) - spent
    n = steps_that_fit(cfg, costs, left, step0_batches)
    budget = format_duration(cfg.max_time)
    one_eval = eval_seconds(costs, cfg.eval_iters)
    if n < 1:
        raise BudgetError(
            f"the time budget of {budget} holds no training here: a step takes "
            f"{_ms(costs.step)}, an evaluation of 2 x {cfg.eval_iters} batches "
            f"{one_eval:.3g} s, and {max(spent, 0):.3g} s went to starting; raise --max_time or "
            "lower --eval_iters")
    k = evaluations(cfg, n)
    total = spent + run_seconds(cfg.replace(max_iters=n), costs, step0_batches)
    warm = (f"; shorter than its warmup of {cfg.warmup_iters:,} steps"
            if n <= cfg.warmup_iters else "")
    line = (f"time budget {budget}: {n:,} steps at {_ms(costs.step)} each, {k + 1} evaluations "
            f"({one_eval:.3g} s each), about {format_duration(total)} in all{warm}")
    return n, line


def _ms(seconds):
    return f"{1000 * seconds:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"
