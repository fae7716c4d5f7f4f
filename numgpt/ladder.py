"""The ladder of the video in one command: python -m numgpt.ladder [--include-scaled] [--seeds=N]

Trains bigram, single_head, multi_head, ffn, residual, layernorm and preln (and scaled with
--include-scaled) with their presets on Tiny Shakespeare, prints their final train/val losses beside
the published ones, and draws every validation curve into one PNG; each rung with attention also
gets its attention map (attention.png in its run folder; docs/ladder.md).

Before training it says how long the ladder will take here, from a few steps of each rung
measured with the step training will use. Run again with the same --out-dir, it continues: a
rung interrupted (Ctrl-C, kill) resumes from its checkpoint, a finished one is not trained again.
"""
import os
import sys
import time

import numpy as np

from . import make_optimizer
from .attention_map import ladder_map
from .budget import run_seconds
from .checkpoint import CheckpointError, read_model_checkpoint
from .cli import USER_ERRORS, OneLineParser
from .config import LADDER, LADDER_TARGETS, format_duration, get_config
from .data import load_dataset
from .distributed import SINGLE, end_with_error
from .env import check_all, mpi_launch
from .model import GPT
from .trainer import STEP0_EVAL_ITERS, TrainingError, new_axes, read_log, save_figure, train


def measure_rung(cfg, ds):
    """budget.Costs of training cfg here, measured on a fresh model with the step training will
    take (numgpt.parallel.step_function, measured or cached): a few training steps, eval batches,
    a checkpoint serialised and a loss plot drawn."""
    from .parallel import step_function
    from .trainer import measure_run_costs
    model = GPT(cfg, seed=cfg.seed)
    opt = make_optimizer(model, cfg)
    step, close, name = step_function(model, cfg)
    try:
        meta = {"step": 0, "config": cfg.to_dict(), "vocab": ds.vocab.chars}
        return measure_run_costs(cfg, ds, model, opt, step, meta, time.perf_counter,
                                 seconds=MEASURE_SECONDS)
    finally:
        close()


MEASURE_SECONDS = 0.2  # per rung, of timed steps (at least budget.MIN_REPS of them)


class Run:
    """One rung and seed of the ladder in its folder, and what is there from an earlier ladder:
    state "new" (nothing), "resume" (a checkpoint of this config short of its last step) or
    "done" (a checkpoint at its last step, whose log holds the final losses)."""

    def __init__(self, stage, cfg, folder):
        self.stage, self.cfg, self.folder = stage, cfg, folder
        self.state, self.step, self.final = "new", 0, None
        self.earlier = os.path.isdir(folder) and any(
            os.path.lexists(os.path.join(folder, f)) for f in ("ckpt.npz", "log.jsonl", "loss.png"))

    def look(self, ds):
        """Read what an earlier ladder left in the folder; returns why it cannot be continued
        on ds (another config or data, a damaged checkpoint), or None."""
        if not self.earlier:
            return None
        ckpt = os.path.join(self.folder, "ckpt.npz")
        if not os.path.isfile(ckpt) or os.path.islink(ckpt):
            return "no checkpoint"
        try:
            saved, chars, _, _, meta = read_model_checkpoint(ckpt)
        except (CheckpointError, *USER_ERRORS) as e:
            return f"its checkpoint is unusable: {e}"
        if saved.to_dict() != self.cfg.to_dict():
            return "trained with another config"
        if chars != ds.vocab.chars or meta.get("data_sha256") != ds.meta.get("sha256"):
            return "trained on other data"
        self.step = meta["step"]
        rows = [r for r in read_log(os.path.join(self.folder, "log.jsonl"))
                if r["step"] == self.cfg.max_iters]
        if self.step >= self.cfg.max_iters and rows:
            self.state, self.final = "done", rows[-1]
        else:
            self.state = "resume"
        return None


def plot_ladder(curves, path):
    fig, ax = new_axes(figsize=(8, 5))
    for name, rows in curves.items():
        line, = ax.plot([r["step"] for r in rows], [r["val_loss"] for r in rows], label=name)
        if name in LADDER_TARGETS:
            ax.axhline(LADDER_TARGETS[name], color=line.get_color(), ls=":", lw=0.8)
    ax.set_ylim(top=min(3.5, ax.get_ylim()[1]))
    save_figure(fig, ax, path, "numgpt ladder on Tiny Shakespeare (dotted: published)",
                "validation loss")


def main(argv=None, prog="python -m numgpt.ladder"):
    ap = OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    # each option also in train.py's spelling (--out_dir as well as --out-dir)
    ap.add_argument("--include-scaled", "--include_scaled", action="store_true",
                    help="also train the scaled rung")
    ap.add_argument("--stages", default=None,
                    help="comma-separated subset of " + ",".join(LADDER))
    ap.add_argument("--seeds", type=int, default=1, help="seeds per rung; the table shows the mean")
    ap.add_argument("--iters-scale", "--iters_scale", type=float, default=1.0,
                    help="multiply max_iters and eval_interval (e.g. 0.1 for a quick look)")
    ap.add_argument("--out-dir", "--out_dir", default="out-ladder",
                    help="where the rungs' runs go; run again, the ladder continues the runs there")
    ap.add_argument("--fresh", action="store_true",
                    help="set the runs in --out-dir aside (renamed *.previous) and train every rung anew")
    ap.add_argument("--data", default=None, help="a UTF-8 text file (default: Tiny Shakespeare)")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when a rung's val loss is more than --tolerance from the published one")
    ap.add_argument("--tolerance", type=float, default=0.05,
                    help="how far a rung's val loss may be from the published one under --check "
                         "(default: 0.05)")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (TrainingError, *USER_ERRORS) as e:
        return end_with_error(f"error: {e}", 2)  # under mpiexec: said by rank 0 only


def _run(args):
    check_all()  # an unreadable NUMGPT_* value: one line now, not partway up the ladder
    launch = mpi_launch()
    if launch is not None and launch[1] != 1:
        raise TrainingError("the ladder trains in one process; run it without mpiexec (train.py "
                            "trains one preset on several: mpiexec -n 2 python train.py "
                            "--preset=preln)")
    if args.seeds < 1:
        raise TrainingError("--seeds must be at least 1")
    if not 0 < args.iters_scale <= 10:
        raise TrainingError("--iters-scale must be in (0, 10]")
    stages = [s for s in LADDER if s != "scaled" or args.include_scaled]
    if args.stages:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in stages if s not in LADDER]
        if unknown:
            raise TrainingError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(LADDER)}")
    ds = load_dataset(args.data)
    cfgs = {}
    for s in stages:
        cfg = get_config(s)
        cfg = cfg.replace(max_iters=max(1, round(cfg.max_iters * args.iters_scale)),
                          eval_interval=max(1, round(cfg.eval_interval * args.iters_scale)),
                          vocab_size=len(ds.vocab))
        cfgs[s] = cfg
    runs = {s: [Run(s, cfg.replace(seed=cfg.seed + k),
                    os.path.join(args.out_dir, f"{s}-seed{cfg.seed + k}"))
                for k in range(args.seeds)] for s, cfg in cfgs.items()}
    for run in (r for rs in runs.values() for r in rs):
        why = "--fresh" if args.fresh and run.earlier else run.look(ds)
        if why:  # an earlier run that is not continued: kept whole, never overwritten
            print(f"  (the earlier run in {run.folder} is kept in {_set_aside(run.folder)}: "
                  f"{why})", flush=True)
    est = _estimate(runs, ds)
    results, curves, maps = {}, {}, []
    t0 = time.time()
    for s, cfg in cfgs.items():
        vals, trains = [], []
        for k, run in enumerate(runs[s]):
            ts = time.time()
            if run.state == "done":
                r = {"train_loss": run.final["train_loss"], "val_loss": run.final["val_loss"],
                     "log": os.path.join(run.folder, "log.jsonl")}
                took = f"trained before, in {run.folder}"
            else:
                long = est[s][k] > LONG_RUNG_SECONDS  # its progress is shown as it trains
                r = train(run.cfg, ds, run.folder, resume=run.state == "resume",
                          quiet=not long, sample_chars=0, world=SINGLE)
                if r["interrupted"]:
                    print(f"interrupted: {s} stopped at step {r['step']} of {run.cfg.max_iters} "
                          f"(its checkpoint is in {run.folder}); the ladder stops here and reports "
                          "no losses; the same command continues it", flush=True)
                    return 0
                took = f"{time.time() - ts:.0f} s" + (f", resumed at step {run.step}"
                                                      if run.state == "resume" else "")
            vals.append(r["val_loss"])
            trains.append(r["train_loss"])
            if k == 0:
                curves[s] = read_log(r["log"])
                if cfg.model == "gpt":  # a rung with attention: its map (docs/ladder.md)
                    maps.append(ladder_map(ds, run.folder, s))
            print(f"  {s:<12} seed {run.cfg.seed}: train {r['train_loss']:.4f} "
                  f"val {r['val_loss']:.4f}  ({took})", flush=True)
        results[s] = (float(np.mean(trains)), float(np.mean(vals)),
                      float(np.std(vals)) if len(vals) > 1 else None)
    os.makedirs(args.out_dir, exist_ok=True)
    png = os.path.join(args.out_dir, "ladder.png")
    plot_ladder(curves, png)
    print(f"\n{'stage':<12} {'params':>10} {'train':>7} {'val':>7} {'published':>9} {'diff':>6}")
    failed = []
    for s, (tr, va, sd) in results.items():
        n = GPT(cfgs[s]).num_params()
        target = LADDER_TARGETS[s]
        diff = va - target
        mark = "" if abs(diff) <= args.tolerance else "  <- off by more than %.2f" % args.tolerance
        if mark:
            failed.append(s)
        sd_s = f" ±{sd:.3f}" if sd is not None else ""
        print(f"{s:<12} {n:>10,} {tr:>7.4f} {va:>7.4f}{sd_s} {target:>9.2f} {diff:>+6.3f}{mark}")
    print(f"\n{len(results)} rungs in {(time.time() - t0) / 60:.1f} min; validation curves: {png}")
    if maps:
        print("attention maps: " + ", ".join(maps))
    if args.check and failed:
        print(f"error: {', '.join(failed)} off the published loss by more than {args.tolerance}",
              file=sys.stderr)
        return 1
    return 0


LONG_RUNG_SECONDS = 120  # a rung expected to train longer shows its progress bar and evaluations


def _estimate(runs, ds):
    """Say how long the ladder will take here, from each rung's costs measured now (measure_rung)
    and the steps each run has left; returns {stage: [seconds of each seed's run]}."""
    todo = [s for s, rs in runs.items() if any(r.state != "done" for r in rs)]
    if todo:
        print("timing a few steps of each rung to estimate the run ...", flush=True)
    est, parts = {}, []
    for s, rs in runs.items():
        costs = measure_rung(rs[0].cfg, ds) if s in todo else None
        est[s] = [0.0 if r.state == "done" else
                  run_seconds(r.cfg, costs, min(r.cfg.eval_iters, STEP0_EVAL_ITERS), start=r.step)
                  for r in rs]
        done = sum(r.state == "done" for r in rs)
        resumed = [f"resumes at step {r.step:,} of {r.cfg.max_iters:,}" for r in rs
                   if r.state == "resume"]
        note = ", ".join((["trained before"] if done == len(rs) else []) + resumed)
        step = (f" at {1000 * costs.step:.3g} ms a step" if costs and costs.step < 1
                else f" at {costs.step:.3g} s a step" if costs else "")
        parts.append(f"{s} {format_duration(sum(est[s]))}{step}" + (f" ({note})" if note else ""))
    total = sum(sum(v) for v in est.values())
    print("expected time on this machine: " + ", ".join(parts)
          + f"; total {format_duration(total)}", flush=True)
    return est


def _set_aside(folder):
    """Rename folder to folder.previous (or .previous-2, -3, ... when that is taken)."""
    n = 1
    while True:
        dest = folder + (".previous" if n == 1 else f".previous-{n}")
        if not os.path.exists(dest):
            os.rename(folder, dest)
            return dest
        n += 1


if __name__ == "__main__":
    sys.exit(main())
