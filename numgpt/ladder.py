"""The ladder of the video in one command: python -m numgpt.ladder [--include-scaled] [--seeds=N]

Trains bigram, single_head, multi_head, ffn, residual, layernorm and preln (and scaled with
--include-scaled) with their presets on Tiny Shakespeare, prints their final train/val losses beside
the published ones, and draws every validation curve into one PNG; each rung with attention also
gets its attention map (attention.png in its run folder; docs/ladder.md).
"""
import argparse
import os
import sys
import time

import numpy as np

from .attention_map import ladder_map
from .cli import USER_ERRORS
from .config import LADDER, LADDER_TARGETS, get_config
from .data import load_dataset
from .distributed import SINGLE, end_with_error
from .env import mpi_launch
from .model import GPT
from .trainer import TrainingError, new_axes, read_log, save_figure, train


def time_one_step(cfg, ds, reps=3):
    """Seconds per training step (best of reps after a warm-up, with the step training will take:
    numgpt.parallel.step_function, measured or cached) and per eval batch of cfg."""
    from .parallel import step_function
    cfg = cfg.replace(vocab_size=len(ds.vocab))
    model = GPT(cfg, seed=0)
    rng = np.random.default_rng(0)
    x, y = ds.get_batch("train", cfg.batch_size, cfg.block_size, rng)
    step, close, _ = step_function(model, cfg)
    try:
        step(x, y, rng=rng)
        t_step, t_eval = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            step(x, y, rng=rng)
            t1 = time.perf_counter()
            model.loss(x, y)
            t_eval.append(time.perf_counter() - t1)
            t_step.append(t1 - t0)
    finally:
        close()
    return min(t_step), min(t_eval)


def expected_seconds(cfg, ds):
    step, ev = time_one_step(cfg, ds)
    n_evals = cfg.max_iters // cfg.eval_interval + 1
    return cfg.max_iters * step + n_evals * 2 * cfg.eval_iters * ev


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
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--include-scaled", action="store_true", help="also train the scaled rung")
    ap.add_argument("--stages", default=None,
                    help="comma-separated subset of " + ",".join(LADDER))
    ap.add_argument("--seeds", type=int, default=1, help="seeds per rung; the table shows the mean")
    ap.add_argument("--iters-scale", type=float, default=1.0,
                    help="multiply max_iters and eval_interval (e.g. 0.1 for a quick look)")
    ap.add_argument("--out-dir", default="out-ladder")
    ap.add_argument("--data", default=None, help="a UTF-8 text file (default: Tiny Shakespeare)")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when a rung's val loss is more than --tolerance from the published one")
    ap.add_argument("--tolerance", type=float, default=0.05)
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except (TrainingError, *USER_ERRORS) as e:
        return end_with_error(f"error: {e}", 2)  # under mpiexec: said by rank 0 only


def _run(args):
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
    print("timing one step of each rung to estimate the run ...", flush=True)
    est = {s: expected_seconds(c, ds) * args.seeds for s, c in cfgs.items()}
    print("expected time on this machine: " + ", ".join(f"{s} {t / 60:.1f} min" for s, t in est.items())
          + f"; total {sum(est.values()) / 60:.1f} min", flush=True)
    results, curves, maps = {}, {}, []
    t0 = time.time()
    for s, cfg in cfgs.items():
        vals, trains = [], []
        for k in range(args.seeds):
            run_cfg = cfg.replace(seed=cfg.seed + k)
            out = os.path.join(args.out_dir, f"{s}-seed{run_cfg.seed}")
            if os.path.isdir(out) and any(os.path.exists(os.path.join(out, f))
                                          for f in ("ckpt.npz", "log.jsonl", "loss.png")):
                kept = _set_aside(out)  # an earlier run: kept whole, never overwritten
                print(f"  (the earlier run in {out} is kept in {kept})", flush=True)
            ts = time.time()
            r = train(run_cfg, ds, out, quiet=True, sample_chars=0, world=SINGLE)
            if r["interrupted"]:
                print(f"interrupted: {s} stopped at step {r['step']} of {run_cfg.max_iters} (its "
                      f"checkpoint is in {out}); the ladder stops here and reports no losses",
                      flush=True)
                return 0
            vals.append(r["val_loss"])
            trains.append(r["train_loss"])
            if k == 0:
                curves[s] = read_log(r["log"])
                if cfg.model == "gpt":  # a rung with attention: its map (docs/ladder.md)
                    maps.append(ladder_map(ds, out, s))
            print(f"  {s:<12} seed {run_cfg.seed}: train {r['train_loss']:.4f} "
                  f"val {r['val_loss']:.4f}  ({time.time() - ts:.0f} s)", flush=True)
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
