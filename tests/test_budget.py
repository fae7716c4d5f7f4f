"""Training to a time budget (numgpt/budget.py, train.py --max_time): durations read and refused,
the number of steps that fits measured costs (fake clocks and fake costs, never real times), a
budgeted run equal to the run of the steps it fixed, and its resume bit for bit."""
import itertools
import os
import subprocess

import numpy as np
import pytest
from cli_tools import one_line_error

import numgpt
from numgpt import budget
from numgpt.budget import BudgetError, Costs
from numgpt.checkpoint import load_checkpoint
from numgpt.config import ConfigError, format_duration, get_config, parse_duration
from numgpt.data import load_dataset
from numgpt.trainer import TrainingError, read_log, train

TINY = ["--n_embd=16", "--n_head=2", "--n_layer=1", "--block_size=16", "--batch_size=4",
        "--eval_iters=2", "--warmup_iters=2"]


def run(python, repo, script, *args):
    env = dict(os.environ, PYTHONPATH=repo)
    return subprocess.run([python, os.path.join(repo, script), *args], capture_output=True,
                          text=True, timeout=300, cwd=repo, env=env)


# ---- durations ----

@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("1.5h", 5400), ("600", 600),
                                          ("0.5m", 30), (" 2 m ", 120), (".5h", 1800), ("0", 0)])
def test_durations_are_read_in_seconds(text, seconds):
    assert parse_duration(text) == seconds
    assert get_config("laptop", max_time=text).max_time == seconds


@pytest.mark.parametrize("text", ["10min", "-5m", "1e3", "inf", "nan", "", "m", "5h30m", "1,5h",
                                  "10 M", "２m"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)
    with pytest.raises(ConfigError, match="max_time must be a duration such as 90s, 10m or 1.5h"):
        get_config("laptop", max_time=text)


def test_durations_are_said_in_the_units_they_are_read_in():
    for seconds in (45, 90, 600, 5400, 7200, 36000):
        assert abs(parse_duration(format_duration(seconds)) - seconds) <= 0.01 * seconds
    assert format_duration(600) == "10m" and format_duration(90) == "90s"


def test_max_time_limits():
    with pytest.raises(ConfigError, match="max_time must be between 0"):
        get_config("laptop", max_time=-1)
    with pytest.raises(ConfigError, match="max_time must be between 0"):
        get_config("laptop", max_time="9000h")


# ---- max_iters or max_time ----

def test_the_default_run_is_a_ten_minute_budget_and_max_iters_turns_it_off():
    assert get_config().max_time == 600 and get_config().eval_interval == 0
    assert get_config(max_iters=50).max_time == 0  # an explicit length: no budget
    assert get_config(max_iters=50, max_time=0).max_iters == 50
    assert get_config(max_time="2m").max_time == 120
    with pytest.raises(ConfigError, match="max_iters and max_time both set the length"):
        get_config(max_iters=50, max_time="2m")
    for rung in numgpt.LADDER:  # the ladder's rungs keep their lengths
        assert get_config(rung).max_time == 0


def test_eval_interval_zero_is_a_tenth_of_the_run():
    assert get_config(max_iters=11000).eval_every == 1100
    assert get_config(max_iters=25).eval_every == 3
    assert get_config(max_iters=4).eval_every == 1
    assert get_config(max_iters=25, eval_interval=7).eval_every == 7
    with pytest.raises(ConfigError, match="eval_interval must be >= 0"):
        get_config(eval_interval=-1)


@pytest.mark.parametrize("args,match", [
    (["--max_time=10min"], "max_time must be a duration"),
    (["--max_time=-3s"], "max_time must be a duration"),
    (["--max_time=90s", "--max_iters=10"], "max_iters and max_time both set the length"),
])
def test_train_refuses_bad_budgets_in_one_line(python, repo, text_file, tmp_path, args, match):
    r = run(python, repo, "train.py", f"--data={text_file}", f"--out_dir={tmp_path / 'o'}",
            *TINY, *args)
    one_line_error(r, match)
    assert not (tmp_path / "o").exists()


# ---- the number of steps that fits ----

COSTS = Costs(step=0.031, eval_batch=0.008, save=0.05, plot=0.2, sample=0.4)


@pytest.mark.parametrize("over", [dict(), dict(eval_interval=250), dict(eval_iters=7),
                                  dict(eval_interval=1)])
@pytest.mark.parametrize("seconds", [5.0, 60.0, 600.0, 3600.0])
def test_the_steps_fixed_are_the_most_that_fit(over, seconds):
    cfg = get_config("laptop", **over)
    n = budget.steps_that_fit(cfg, COSTS, seconds, step0_batches=10)
    assert n >= 1

    def total(k):
        return budget.run_seconds(cfg.replace(max_iters=k), COSTS, step0_batches=10)
    assert total(n) <= seconds  # fits ...
    # ... and a run one step longer would not (with eval_interval=0 the planner counts the
    # most evaluations a run can make, EVALS_PER_RUN: within that of the most that fit)
    slack = 0 if cfg.eval_interval else budget.EVALS_PER_RUN * budget.eval_seconds(COSTS, 100)
    assert total(n + 1) > seconds - slack


def test_the_run_counts_its_evaluations_and_the_sample():
    cfg = get_config("laptop", max_iters=1000, eval_interval=300, eval_iters=5)
    c = Costs(step=1.0, eval_batch=10.0, save=100.0, plot=1000.0, sample=10000.0)
    # 1000 steps; evaluations at 0 (2 x 3 batches), 300, 600, 900 and 1000 (2 x 5 batches),
    # each with a checkpoint (100) and a plot (1000); the sample
    assert budget.run_seconds(cfg, c, step0_batches=3) == 1000 + (60 + 1100) + 4 * (100 + 1100) \
        + 10000
    # resumed at step 450: 550 steps, evaluations at 600, 900 and 1000
    assert budget.run_seconds(cfg, c, 3, start=450) == 550 + 3 * 1200 + 10000
    # resumed at 600, a step that is evaluated: 400 steps, 600 again, 900 and 1000
    assert budget.run_seconds(cfg, c, 3, start=600) == 400 + 3 * 1200 + 10000


def test_the_plan_counts_the_last_evaluations_whole_validation_text():
    """The last evaluation reads the whole validation text (trainer.whole_text_loss): its cost
    beyond eval_iters batches (Costs.last_val) is counted once, in the run and in the plan."""
    from types import SimpleNamespace

    from numgpt.trainer import last_val_seconds
    cfg = get_config("laptop", max_iters=1000, eval_interval=300, eval_iters=5)
    c = Costs(step=1.0, eval_batch=10.0, save=100.0, plot=1000.0, sample=10000.0)
    more = Costs(step=1.0, eval_batch=10.0, save=100.0, plot=1000.0, sample=10000.0,
                 last_val=250.0)
    assert budget.run_seconds(cfg, more, 3) == budget.run_seconds(cfg, c, 3) + 250
    assert budget.run_seconds(cfg, more, 3, start=450) == budget.run_seconds(cfg, c, 3, 450) + 250
    n, m = budget.steps_that_fit(cfg, c, 20000.0, 3), budget.steps_that_fit(cfg, more, 20000.0, 3)
    assert m < n
    for k, costs in ((n, c), (m, more)):  # the most steps that fit, with last_val or without
        assert budget.run_seconds(cfg.replace(max_iters=k), costs, 3) <= 20000.0
        assert budget.run_seconds(cfg.replace(max_iters=k + 1), costs, 3) > 20000.0
    # 1,000 windows of 64 at 8 windows a batch: 125 batches' worth, of which an ordinary
    # evaluation's val half takes eval_iters
    ds = SimpleNamespace(val=np.zeros(64 * 1000 + 1, dtype=np.uint16))
    cfg = get_config("laptop", block_size=64, batch_size=8, eval_iters=100)
    assert last_val_seconds(cfg, ds, 0.5) == 0.5 * (125 - 100)


def test_plan_says_the_budget_in_one_line_and_refuses_one_that_holds_nothing():
    cfg = get_config("laptop", max_time="10m")
    n, line = budget.plan(cfg, COSTS, spent=3.0, step0_batches=10)
    assert line.startswith(f"time budget 10m: {n:,} steps at 31 ms each, 11 evaluations")
    assert "\n" not in line
    assert budget.run_seconds(cfg.replace(max_iters=n), COSTS, 10) + 3.0 <= 600
    with pytest.raises(BudgetError, match="the time budget of 2s holds no training here"):
        budget.plan(get_config("laptop", max_time="2s"), COSTS, spent=1.5, step0_batches=10)


class FakeClock:
    """A clock that moves only when told: advance(s) is what a timed call costs."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, s):
        self.now += s


def test_timed_mean_leaves_out_the_calls_of_its_warm_seconds():
    clock = FakeClock()
    costs = iter([0.9, 0.2] + [0.1, 0.1, 0.4, 0.1] + [9.0] * 10)
    calls = []

    def fn():
        calls.append(1)
        clock.advance(next(costs))
    # 1 s warm: two untimed calls (0.9 + 0.2); then timed until 0.7 s >= 0.65 s, the mean of four
    assert budget.timed_mean(fn, clock, 3, 0.65, warm_seconds=1.0) == pytest.approx(0.175)
    assert len(calls) == 6


def test_timed_mean_caps_a_one_off_stall_but_counts_slow_calls_that_recur():
    clock = FakeClock()
    costs = iter([0.1] + [0.1] * 19 + [5.0] + [0.1] * 100)

    def fn():
        clock.advance(next(costs))
    # 20 timed calls of 0.1 and one stall of 5.0 (counted as 4 x the median 0.1): 2.4 / 21
    assert budget.timed_mean(fn, clock, 21, 0.0) == pytest.approx(2.4 / 21)
    clock = FakeClock()
    costs = iter([0.1] + [0.1, 0.3] * 20)
    # every other call three times slower: no cap reaches them, the plain mean
    assert budget.timed_mean(fn, clock, 20, 0.0) == pytest.approx(0.2)


def test_measure_costs_takes_means_after_an_untimed_first_call():
    clock = FakeClock()
    steps = iter([5.0] + [0.25, 0.35] * 10)  # the first (untimed) call is slow
    counts = {"step": 0}

    def step_once():
        counts["step"] += 1
        clock.advance(next(steps))
    c = budget.measure_costs(step_once, lambda: clock.advance(0.1), lambda: clock.advance(2.0),
                             clock, plot_once=lambda: clock.advance(0.5),
                             sample_once=lambda: clock.advance(3.0), seconds=1.0)
    assert counts["step"] == 5  # 1 untimed, then 0.25 + 0.35 + 0.25 + 0.35 >= 1 s
    assert c == Costs(step=pytest.approx(0.3), eval_batch=pytest.approx(0.1), save=2.0,
                      plot=0.5, sample=3.0)


def test_restored_after_puts_weights_and_adamw_state_back_bit_for_bit():
    m = numgpt.build_model("preln", n_layer=1, vocab_size=11)
    opt = numgpt.make_optimizer(m)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 11, (4, 8))
    _, g = m.loss_and_grads(x, x, rng=rng)
    opt.step(g)
    before = ({k: v.copy() for k, v in m.params.items()}, {k: v.copy() for k, v in opt.m.items()},
              opt.t)
    arrays = [id(v) for v in m.params.values()]
    with budget.restored_after(m, opt):
        for _ in range(3):
            _, g = m.loss_and_grads(x, x, rng=rng)
            opt.step(g)
        assert not np.array_equal(m.params["lm_head.w"], before[0]["lm_head.w"])
    assert [id(v) for v in m.params.values()] == arrays and opt.t == before[2]
    for k in before[0]:
        np.testing.assert_array_equal(m.params[k], before[0][k])
        np.testing.assert_array_equal(opt.m[k], before[1][k])


# ---- budgeted runs ----

def ticking_clock(tick=0.01):
    """A clock that moves by tick at every reading: every timed call measures one tick."""
    t = itertools.count()
    return lambda: next(t) * tick


def budget_cfg(**kw):
    base = dict(n_embd=16, n_head=2, n_layer=2, block_size=16, batch_size=4, eval_iters=2,
                dropout=0.1, warmup_iters=3, max_time=10.0)
    base.update(kw)
    return get_config("laptop", **base)


def rows(log):
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in read_log(log)]


def same_params(a, b):
    pa, _, _ = load_checkpoint(a)
    pb, _, _ = load_checkpoint(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])


def test_a_budgeted_run_is_the_run_of_the_steps_it_fixed(text_file, tmp_path):
    ds = load_dataset(text_file)
    b = train(budget_cfg(), ds, str(tmp_path / "b"), quiet=True, sample_chars=0,
              clock=ticking_clock())
    n = b["max_iters"]
    # every timed call took one tick of 0.01 s, and so did every other reading of the clock
    # (measuring took a few hundred): what is left of the budget of 10 s holds the evaluations
    # (6 ticks each) and the steps fixed
    cfg, ticks = budget_cfg(), Costs(0.01, 0.01, 0.01, 0.01)
    assert budget.steps_that_fit(cfg, ticks, (1 - budget.RESERVE) * 10 - 6.0, 2) <= n
    assert n <= budget.steps_that_fit(cfg, ticks, (1 - budget.RESERVE) * 10 - 3.0, 2)
    assert n >= 10 and b["step"] == n
    _, _, meta = load_checkpoint(b["checkpoint"])
    assert meta["config"]["max_iters"] == n and meta["config"]["max_time"] == 10.0
    # the run with max_iters=n and no budget: the same evaluations, the same weights
    f = train(budget_cfg(max_time=0, max_iters=n), ds, str(tmp_path / "f"), quiet=True,
              sample_chars=0)
    assert rows(b["log"]) == rows(f["log"])
    assert [s for s, _, _ in rows(b["log"])] == list(range(0, n, -(-n // 10))) + [n]
    same_params(b["checkpoint"], f["checkpoint"])


def test_a_budgeted_run_resumes_its_schedule_bit_for_bit(text_file, tmp_path):
    ds = load_dataset(text_file)
    full = train(budget_cfg(), ds, str(tmp_path / "full"), quiet=True, sample_chars=0,
                 clock=ticking_clock())
    n = full["max_iters"]
    part = train(budget_cfg(), ds, str(tmp_path / "part"), quiet=True, sample_chars=0,
                 clock=ticking_clock(), stop_at=7)
    assert part["interrupted"] and part["step"] == 7 and part["max_iters"] == n
    # resumed with a clock that would fix another length: the checkpoint's length is kept
    rest = train(budget_cfg(), ds, str(tmp_path / "part"), resume=True, quiet=True,
                 sample_chars=0, clock=ticking_clock(0.0005))
    assert rest["step"] == rest["max_iters"] == n
    assert rows(full["log"]) == rows(rest["log"])
    same_params(full["checkpoint"], rest["checkpoint"])


def test_resuming_a_budgeted_run_with_another_length(text_file, tmp_path):
    ds = load_dataset(text_file)
    out = str(tmp_path / "o")
    r = train(budget_cfg(), ds, out, quiet=True, sample_chars=0, clock=ticking_clock(),
              stop_at=4)
    with pytest.raises(TrainingError, match="has a time budget of 10s, which fixed its length at"):
        train(budget_cfg(max_time=20.0), ds, out, resume=True, quiet=True, sample_chars=0,
              max_time_given=True)
    # another budget that was not asked for (a preset's): the run's own length
    again = train(budget_cfg(max_time=20.0), ds, out, resume=True, quiet=True, sample_chars=0,
                  stop_at=r["step"] + 1)
    assert again["max_iters"] == r["max_iters"] and again["step"] == r["step"] + 1
    longer = train(budget_cfg(max_time=0, max_iters=r["max_iters"] + 5), ds, out, resume=True,
                   quiet=True, sample_chars=0)  # an explicit --max_iters: that length
    assert longer["step"] == r["max_iters"] + 5


def test_a_budgeted_run_resumed_keeps_its_eval_interval_unless_given_one(text_file, tmp_path):
    ds = load_dataset(text_file)
    out = str(tmp_path / "o")
    r = train(budget_cfg(eval_interval=4), ds, out, quiet=True, sample_chars=0,
              clock=ticking_clock(), stop_at=9)
    n = r["max_iters"]
    train(budget_cfg(), ds, out, resume=True, quiet=True, sample_chars=0, stop_at=14)
    assert [row["step"] for row in read_log(os.path.join(out, "log.jsonl"))] == [0, 4, 8, 12]
    r = train(budget_cfg(eval_interval=5), ds, out, resume=True, quiet=True, sample_chars=0)
    steps = [row["step"] for row in read_log(os.path.join(out, "log.jsonl"))]
    assert r["step"] == n and steps == [0, 4, 8, 12] + list(range(15, n, 5)) + [n]


def test_an_unbudgeted_run_resumed_by_the_default_command_keeps_its_length(text_file, tmp_path):
    ds = load_dataset(text_file)
    out = str(tmp_path / "o")
    train(budget_cfg(max_time=0, max_iters=12), ds, out, quiet=True, sample_chars=0, stop_at=5)
    r = train(budget_cfg(), ds, out, resume=True, quiet=True, sample_chars=0)  # budget on
    assert r["step"] == r["max_iters"] == 12


def test_a_budget_that_holds_no_training_is_refused_and_leaves_nothing(text_file, tmp_path):
    ds = load_dataset(text_file)
    out = tmp_path / "o"
    with pytest.raises(BudgetError, match="holds no training here"):
        train(budget_cfg(), ds, str(out), quiet=True, sample_chars=0, clock=ticking_clock(1.0))
    assert not out.exists()
    out.mkdir()  # an out_dir of the user's: left as it was
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(BudgetError):
        train(budget_cfg(), ds, str(out), quiet=True, sample_chars=0, clock=ticking_clock(1.0))
    assert os.listdir(out) == ["notes.txt"]


def test_train_py_says_the_budget_and_keeps_to_the_steps_it_fixed(python, repo, text_file,
                                                                 tmp_path):
    out = tmp_path / "o"
    args = [f"--data={text_file}", f"--out_dir={out}", *TINY]
    r = run(python, repo, "train.py", *args, "--max_time=8s")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("time budget 8s: "))
    n = int(line.split(": ")[1].split(" steps")[0].replace(",", ""))
    _, _, meta = load_checkpoint(str(out / "ckpt.npz"))
    assert meta["step"] == meta["config"]["max_iters"] == n
    assert read_log(str(out / "log.jsonl"))[-1]["step"] == n
    # resumed by the default command (whose preset has a budget of 10m) or with its own budget:
    # the length it has; with another budget: refused
    for extra in ([], ["--max_time=8s"]):
        r = run(python, repo, "train.py", *args, "--resume", *extra)
        assert r.returncode == 0 and f"resuming from step {n:,} of {n:,} (fixed by its time " \
            "budget of 8s)" in r.stdout, r.stderr
    r = run(python, repo, "train.py", *args, "--resume", "--max_time=9s")
    one_line_error(r, "has a time budget of 8s, which fixed its length at")
