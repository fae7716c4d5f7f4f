"""Data parallelism over MPI, measured on this machine and modelled for several (docs/distributed.md).

    python bench/mpi_scaling.py --presets preln,laptop --seconds 30 --results r.json  # measure
    python bench/mpi_scaling.py --presets scaled --seconds 60 --rounds 1 --results r.json
    python bench/mpi_scaling.py --presets= --model --results r.json     # the model's tables

Measure: for each preset, training steps (forward, backward, the gradients' Allreduce, clipping
and AdamW, on random ids) run as 1 process with all the cores' threads, and as `mpiexec -n R`
ranks with cores / R threads each (R = --ranks, default 2), in turns (a layout's turn is a new
job of --seconds of timed steps after a few untimed ones; the layouts alternate for --rounds
rounds, so that a slow spell of a shared machine falls on both). Reported: tokens/s (the median
of the turns), the step each layout took (numgpt/parallel.py), and the part of a step that rank
0 spent in the Allreduce (waiting for the other ranks included).

Model: a step on N machines, each computing B/N rows and all-reducing the gradients in a ring
(each machine sends and receives 2 (N - 1) / N times the gradients' bytes), with no overlap of
computing and communicating (numgpt all-reduces after the backward pass):

    t_N = t_1 / N + 2 (N - 1) / N * bytes / bandwidth,      speed-up = t_1 / t_N

t_1 from the tokens/s measured on one machine; latency neglected (2 (N - 1) messages a step).
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

MACHINES = (4, 8)
LINKS = {"1 Gbit/s": 1e9 / 8, "10 Gbit/s": 10e9 / 8}  # bytes per second, nominal


def worker(preset, seconds, warmup):
    """One layout's turn (in every rank): timed steps; rank 0 prints a JSON line."""
    import numpy as np

    import numgpt
    from numgpt.distributed import get_world, train_step
    from numgpt.optim import clip_grad_norm, get_lr
    world = get_world()
    cfg = numgpt.get_config(preset, vocab_size=65)
    model = numgpt.GPT(cfg, seed=cfg.seed, dtype=np.float32)
    if cfg.kernels:
        from numgpt import kernels
        kernels.warmup("float32", say=lambda msg: None, fused=cfg.dropout == 0)
    opt = numgpt.make_optimizer(model, cfg)
    step, close, name = train_step(world, model, cfg)
    in_allreduce = [0.0]
    allreduce = world.allreduce

    def timed_allreduce(buf, what=""):
        t0 = time.perf_counter()
        allreduce(buf, what)
        if what == "the gradients' Allreduce":
            in_allreduce[0] += time.perf_counter() - t0
        return buf
    world.allreduce = timed_allreduce
    rng = np.random.default_rng(0)
    shape = (cfg.batch_size, cfg.block_size)

    def one(it):
        x, y = rng.integers(0, 65, shape), rng.integers(0, 65, shape)
        loss, grads = step(x, y, train=True, rng=rng)
        clip_grad_norm(grads, cfg.grad_clip)
        opt.step(grads, get_lr(it, cfg))
    for it in range(warmup):
        one(it)
    in_allreduce[0] = 0.0
    world.any(False)  # start together
    t0 = time.perf_counter()
    n = 0
    while True:  # rank 0 decides when the turn ends, so that all ranks stop at the same step
        one(warmup + n)
        n += 1
        # (a vote as the trainer's stop vote, and as costly)
        if world.any(world.is_root and time.perf_counter() - t0 >= seconds):
            break
    dt = time.perf_counter() - t0
    close()
    if world.is_root:
        print(json.dumps({"preset": preset, "ranks": world.size, "threads": world.threads,
                          "step": name, "steps": n, "seconds": dt,
                          "tok_s": n * cfg.batch_size * cfg.block_size / dt,
                          "allreduce_s": in_allreduce[0] / n,
                          "bytes": 4 * (model.num_params() + 1)}), flush=True)


def run_turn(preset, ranks, seconds, warmup, mpiexec):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", preset, str(seconds),
           str(warmup)]
    if ranks > 1:
        cmd = [mpiexec, "-n", str(ranks)] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def measure(presets, ranks, seconds, rounds, mpiexec):
    from numgpt.parallel import cpu
    print(f"CPU {cpu()}, {os.cpu_count()} cores; {rounds} rounds of {seconds:g} s turns", flush=True)
    print("| preset | layout | step | tokens/s | step ms | of it in the Allreduce |")
    print("|---|---|---|---:|---:|---:|")
    out = {}
    for preset in presets:
        turns = {1: [], ranks: []}
        warmup = 2 if preset == "scaled" else 20
        for r in range(rounds):
            for layout in ([1, ranks] if r % 2 == 0 else [ranks, 1]):
                turns[layout].append(run_turn(preset, layout, seconds, warmup, mpiexec))
        for layout, rows in turns.items():
            tok = median([t["tok_s"] for t in rows])
            step_ms = median([1000 * t["seconds"] / t["steps"] for t in rows])
            ar = median([1000 * t["allreduce_s"] for t in rows])
            threads = rows[0]["threads"] or os.cpu_count()
            kind = f"{layout} rank{'s' * (layout > 1)} x {threads} thread{'s' * (threads > 1)}"
            steps = "/".join(sorted({t["step"] for t in rows}))
            print(f"| {preset} | {kind} | {steps} | {tok:,.0f} | {step_ms:.3g} | "
                  f"{ar:.3g} ms |" if layout > 1 else
                  f"| {preset} | {kind} | {steps} | {tok:,.0f} | {step_ms:.3g} | - |", flush=True)
            out[(preset, layout)] = tok
    return out


def allreduce_bytes(preset):
    """Bytes a rank all-reduces per step: every gradient and the loss, float32."""
    import numgpt
    from numgpt.model import param_shapes
    cfg = numgpt.get_config(preset, vocab_size=65)
    n = sum(int(__import__("numpy").prod(s)) for s in param_shapes(cfg).values())
    return 4 * (n + 1)


def step_seconds(t1, n, nbytes, bandwidth):
    """The model's step time on n machines (t1: one machine's)."""
    return t1 / n + 2 * (n - 1) / n * nbytes / bandwidth


def bytes_table():
    """The bytes each rank all-reduces per step, and their ring time, for every preset."""
    import numgpt
    print("\n| preset | parameters | bytes a step | "
          + " | ".join(f"ring, {n} machines, {link}" for n in MACHINES for link in LINKS) + " |")
    print("|---|---:|---:|" + "---:|" * (len(MACHINES) * len(LINKS)))
    for preset in numgpt.PRESETS:
        b = allreduce_bytes(preset)
        cells = [f"{1000 * step_seconds(0.0, n, b, bw):.3g} ms" for n in MACHINES
                 for bw in LINKS.values()]
        print(f"| {preset} | {b // 4 - 1:,} | {b / 1e6:.3g} MB | " + " | ".join(cells) + " |")


def model_table(tok_s):
    """tok_s: {preset: tokens/s measured on one machine}."""
    import numgpt
    print("\n| preset | gradient bytes a step | one machine: tokens/s, step | "
          + " | ".join(f"{n} machines, {link}" for n in MACHINES for link in LINKS) + " |")
    print("|---|---:|---:|" + "---:|" * (len(MACHINES) * len(LINKS)))
    for preset, tok in tok_s.items():
        cfg = numgpt.get_config(preset)
        t1 = cfg.batch_size * cfg.block_size / tok
        b = allreduce_bytes(preset)
        cells = []
        for n in MACHINES:
            for bw in LINKS.values():
                cells.append(f"{t1 / step_seconds(t1, n, b, bw):.2f}x")
        step = f"{1000 * t1:.3g} ms" if t1 < 1 else f"{t1:.2f} s"
        print(f"| {preset} | {b / 1e6:.3g} MB | {tok:,.0f}, {step} | " + " | ".join(cells) + " |")


def scaled_hours(tok_s, eval_seconds):
    """Hours of the scaled rung (max_iters steps, an evaluation every eval_interval) on 1, 4
    and 8 machines: steps by the model, evaluations split over the machines (no traffic but
    their losses)."""
    import numgpt
    cfg = numgpt.get_config("scaled")
    t1 = cfg.batch_size * cfg.block_size / tok_s
    b = allreduce_bytes("scaled")
    evals = cfg.max_iters // cfg.eval_interval + 1
    print(f"\nscaled rung: {cfg.max_iters} steps of {cfg.batch_size} x {cfg.block_size} tokens, "
          f"{evals} evaluations of {eval_seconds:.0f} s on one machine")
    print("| machines | link | step s | hours |")
    print("|---:|---|---:|---:|")
    print(f"| 1 | - | {t1:.2f} | {(cfg.max_iters * t1 + evals * eval_seconds) / 3600:.1f} |")
    for n in MACHINES:
        for link, bw in LINKS.items():
            t = step_seconds(t1, n, b, bw)
            hours = (cfg.max_iters * t + evals * eval_seconds / n) / 3600
            print(f"| {n} | {link} | {t:.2f} | {hours:.1f} |")


def eval_seconds_scaled(batches):
    """Seconds of one evaluation of the scaled rung on this machine (2 x eval_iters forward
    passes of a batch), from `batches` timed ones."""
    import numpy as np

    import numgpt
    from numgpt import kernels
    cfg = numgpt.get_config("scaled", vocab_size=65)
    kernels.warmup("float32", say=lambda msg: None, fused=False)
    model = numgpt.GPT(cfg, seed=0, dtype=np.float32)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 65, (cfg.batch_size, cfg.block_size))
    model.loss(x, x)  # warm
    t0 = time.perf_counter()
    for _ in range(batches):
        model.loss(x, x)
    per = (time.perf_counter() - t0) / batches
    print(f"scaled rung: a forward pass of a batch (evaluation) {per:.2f} s, the mean "
          f"of {batches}", flush=True)
    return 2 * cfg.eval_iters * per


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="preln,laptop")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--results", default=None,
                    help="a JSON file the measured tokens/s are added to (and --model reads)")
    ap.add_argument("--model", action="store_true",
                    help="print the model's tables from the measured tokens/s")
    ap.add_argument("--eval-batches", type=int, default=3,
                    help="forward passes timed for the scaled rung's evaluation time")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        preset, seconds, warmup = args.worker
        return worker(preset, float(seconds), int(warmup))
    from numgpt.env import EnvError, check_all
    try:
        check_all()  # a variable the ranks could not read: one line here, not one per rank
    except EnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    presets = [p for p in args.presets.split(",") if p]
    tok = measure(presets, args.ranks, args.seconds, args.rounds, mpiexec) if presets else {}
    tok = {f"{p} {n}": t for (p, n), t in tok.items()}
    if args.results:
        if os.path.isfile(args.results):
            with open(args.results) as f:
                tok = {**json.load(f), **tok}
        with open(args.results, "w") as f:
            json.dump(tok, f, indent=1)
    if args.model:  # one machine's best layout, for each preset measured
        best = {}
        for key, t in tok.items():
            preset = key.split()[0]
            best[preset] = max(best.get(preset, 0), t)
        bytes_table()
        model_table(best)
        if "scaled" in best:
            scaled_hours(best["scaled"], eval_seconds_scaled(args.eval_batches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
