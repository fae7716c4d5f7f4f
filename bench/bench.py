"""numgpt against PyTorch's CPU build, side by side in one run: training step speed, model FLOP
utilisation, peak memory, and sampling speed.

    python bench/bench.py                                  # all configs, 2 threads
    python bench/bench.py --configs tiny,laptop --threads 2
    python bench/bench.py --torch-python /path/to/venv-with-torch/bin/python
    python bench/bench.py --configs laptop --numpy-first --no-sample   # import order's effect

Each implementation of a config runs in a subprocess of its own (so peak memory is its own):
numgpt, PyTorch with the video's explicit attention, and PyTorch with
scaled_dot_product_attention. numgpt and PyTorch get the same config, batch, thread count and
random token ids. The workers take turns: each warms up alone, then in every round each runs a
few timed steps while the others wait, never two at once, in an order that rotates from round to
round. The speed of this shared machine drifts by tens of percent over minutes; timed one after
the other, one side could get a fast spell and the other a slow one, and the ratio moved with it.
Taking turns spreads the drift over both. All of a config's workers stay alive through its
rounds, so the machine needs memory for all of them at once (the sum of the table's peak MB
columns; the full config's is the largest). A training step is forward + backward + AdamW; the
figure is the median over all timed steps (the first step of a turn, after the others ran, is
not timed for the short configs). Sampling speed is the median of whole generate runs, taken in
turns the same way. Where torch cannot be imported, its columns say so. numgpt's kernels are
compiled (or loaded from their cache) by a process of their own before anything is timed.

Model FLOP utilisation (MFU) = model FLOPs per second / the float32 matmul peak measured here with
NumPy at the same thread count, where model FLOPs per token = 6 N + 12 L T C (N: parameters
outside the embedding tables; the attention term as nanoGPT and PaLM count it). The peak takes
a turn in every round of a config, beside its steps (the best of PEAK_REPEATS 2048-square
products a turn): the table's MFU is the steps' median rate over the median of those peaks, so
both come from the same minutes of the machine. The strictest figure, against the highest peak
the run saw (measured alone at its start and end, or in any turn), is printed under the table.
"""
import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

CONFIGS = {
    # name: (preset, overrides, rounds, timed steps per turn, untimed steps starting a turn,
    #        warm-up steps)
    # The rounds: as many as fit in about a minute where steps are short, since on a shared
    # machine a ratio from a few rounds moves with the machine's spells (docs/benchmarks.md,
    # "How many rounds").
    # tiny steps take milliseconds: many of them, after a warm-up long enough for both sides to
    # settle (the first few hundred steps of a process run slower than later ones)
    "tiny": ("residual", dict(), 24, 50, 1, 100),
    "laptop": ("laptop", dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
               24, 5, 1, 5),
    "hour": ("hour", dict(), 16, 5, 1, 5),  # the hour preset: L4 H6 C192 T128 B8, dropout 0.1
    # numgpt's first mid steps run slow while its heap grows and settles: three warm-up steps
    # (the same for PyTorch)
    "mid": ("scaled", dict(batch_size=8), 9, 1, 0, 3),
    "full": ("scaled", dict(batch_size=64), 2, 1, 0, 1),
}
SAMPLE_ROUNDS = 9  # sampling speed: the median of this many whole generate runs per side (as
#                   many as fit in about a minute, as for training above)
SAMPLE_CONFIGS = {"full": ("scaled", dict()), "laptop": CONFIGS["laptop"][:2]}
NUMPY_FIRST = "numgpt-np-first"  # the --numpy-first job's name
TURN_TIMEOUT_S = 3600  # one turn (or a worker's start and warm-up) taking longer: the worker failed


# ---------------------------------------------------------------- workers (one per subprocess)

def _peak_rss_mb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _batch(cfg, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size))
    y = rng.integers(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size))
    return x, y


def numgpt_train_unit(cfg):
    """One timed training step of numgpt, as train.py takes it; returns its seconds."""
    import numpy as np

    import numgpt
    model = numgpt.GPT(cfg, seed=0)
    opt = numgpt.make_optimizer(model)
    # what train.py uses: the fastest step here, measured after the kernels are loaded (a first
    # call's loading would count against its step and could keep it out of the running)
    step = numgpt.training_step(model)
    name = step.name
    rng = np.random.default_rng(0)
    x, y = _batch(cfg)

    def unit():
        t0 = time.perf_counter()
        loss, grads = step(x, y, rng=rng)
        numgpt.clip_grad_norm(grads, 1.0)
        opt.step(grads)
        return time.perf_counter() - t0
    unit.step_name = name  # reported with the worker's result
    return unit


def torch_train_unit(cfg, attention):
    import torch
    from torch_reference import TorchGPT
    model = TorchGPT(cfg, attention=attention).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                            eps=cfg.eps, weight_decay=cfg.weight_decay)
    x, y = (torch.as_tensor(a) for a in _batch(cfg))

    def unit():
        t0 = time.perf_counter()
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - t0
    return unit


def numgpt_sample_unit(cfg, n_tokens):
    """One whole generate of n_tokens from a full context; returns tokens/s."""
    import numpy as np

    import numgpt
    from numgpt.generate import generate
    model = numgpt.GPT(cfg, seed=0)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, cfg.block_size))
    generate(model, prompt, 4, rng=np.random.default_rng(0))  # warm-up (kernels, caches)

    def unit():
        t0 = time.perf_counter()
        generate(model, prompt, n_tokens, rng=np.random.default_rng(0))
        return n_tokens / (time.perf_counter() - t0)
    return unit


def torch_sample_unit(cfg, n_tokens):
    """The video's generate: crop to block_size, run the whole context, take the last logits."""
    import torch
    from torch_reference import TorchGPT
    model = TorchGPT(cfg, attention="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (1, cfg.block_size), generator=g)

    def run(n):
        nonlocal idx
        with torch.no_grad():
            for _ in range(n):
                logits, _ = model(idx[:, -cfg.block_size:])
                probs = torch.softmax(logits[:, -1, :], dim=-1)
                idx = torch.cat([idx, torch.multinomial(probs, 1, generator=g)], dim=1)
    run(2)

    def unit():
        t0 = time.perf_counter()
        run(n_tokens)
        return n_tokens / (time.perf_counter() - t0)
    return unit


PEAK_N = 2048  # the matmul peak's product: float32 [n, n] @ [n, n]
PEAK_REPEATS = 3  # products per turn of the peak taken in turns beside a config's steps


def matmul_peak_unit(repeats):
    """The float32 matmul peak as a unit: the best rate (FLOP/s) of `repeats` PEAK_N-square
    products by NumPy, the first product (buffers, threads) made before."""
    import numpy as np
    n = PEAK_N
    a = np.random.rand(n, n).astype(np.float32)
    b = np.random.rand(n, n).astype(np.float32)
    a @ b

    def unit():
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        return 2 * n ** 3 / best
    return unit


def worker_main(spec):
    """A worker: the matmul peak (one answer), or a job that warms up, says READY, then answers
    each "RUN k skip" on stdin with the measurements of k units (the first skip of them dropped)
    and "END" with its peak memory: a training or sampling job, or the matmul peak in turns."""
    sys.path.insert(0, HERE)
    sys.path.insert(0, REPO)
    if spec.get("numpy_first"):  # as a user's script may: NumPy loaded before numgpt
        import numpy  # noqa: F401
    numpy_first = "numpy" in sys.modules  # (reported with the result)
    import numgpt  # noqa: F401  (else first, as train.py imports it)
    if spec["kind"] == "peak":
        out = {"flops": matmul_peak_unit(5)(), "peak_rss_mb": _peak_rss_mb()}
        print("RESULT " + json.dumps(out), flush=True)
        return
    if spec["kind"] == "warm":  # compile (or load) every kernel once, before anything is timed
        from numgpt import kernels
        kernels.warmup(say=lambda msg: None)
        print("RESULT {}", flush=True)
        return
    if spec["kind"] == "peak_turns":  # the peak again in every round, beside a config's steps
        # OpenBLAS's threads spin for ~0.1 s after a product by default, which would take the
        # cores from the next worker's turn: numgpt's short spins, as its own workers have
        from numgpt import _threads
        _threads.short_spins()
        unit = matmul_peak_unit(PEAK_REPEATS)
    else:
        unit = _job_unit(spec)
    for _ in range(spec.get("warmup", 0)):
        unit()
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd and cmd[0] == "RUN":
            k, skip = int(cmd[1]), int(cmd[2])
            values = [unit() for _ in range(k)][skip:]
            print("TURN " + json.dumps(values), flush=True)
        elif cmd and cmd[0] == "END":
            break
    print("RESULT " + json.dumps({"peak_rss_mb": _peak_rss_mb(), "numpy_first": numpy_first,
                                  "step": getattr(unit, "step_name", None)}), flush=True)


def _job_unit(spec):
    """The unit of a training or sampling job: one step (seconds) or one generate (tok/s)."""
    import numgpt
    cfg = numgpt.get_config(spec["preset"], **spec["overrides"])
    if spec["impl"].startswith("torch"):
        import torch
        torch.set_num_threads(spec["threads"])
        torch.manual_seed(0)
    if spec["kind"] == "train":
        unit = (numgpt_train_unit(cfg) if spec["impl"] == "numgpt"
                else torch_train_unit(cfg, spec["impl"].split("-")[1]))
    else:
        unit = (numgpt_sample_unit(cfg, spec["n_tokens"]) if spec["impl"] == "numgpt"
                else torch_sample_unit(cfg, spec["n_tokens"]))
    return unit


# ---------------------------------------------------------------- the parent: run and report

class WorkerError(Exception):
    """A worker failed or went silent; the message is one line."""


class Worker:
    """A worker subprocess and the lines it prints (read on a thread, so a wait can time out)."""

    def __init__(self, python, spec, threads):
        from numgpt.env import THREAD_VARIABLES  # (main put the repo on sys.path)
        env = dict(os.environ)
        for k in THREAD_VARIABLES:
            env[k] = str(threads)
        self.err = tempfile.TemporaryFile(mode="w+")
        self.lines = queue.Queue()
        try:
            self.proc = subprocess.Popen(
                [python, os.path.abspath(__file__), "--worker", json.dumps(dict(spec, threads=threads))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True, env=env,
                cwd=REPO, bufsize=1)
        except OSError as e:
            self.proc = None
            self.start_error = f"could not start {python}: {e.strerror}"
            return
        self.start_error = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # end of output: the worker exited

    def expect(self, tag, timeout=TURN_TIMEOUT_S):
        """The rest of the next line that starts with tag (other output is skipped)."""
        if self.proc is None:
            raise WorkerError(self.start_error)
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise WorkerError(f"no answer in {timeout:.0f} s") from None
            if line is None:
                self.proc.wait()
                self.err.seek(0)
                last = (self.err.read().strip().splitlines() or ["no output"])[-1]
                raise WorkerError(f"exited ({self.proc.returncode}): {last}")
            at = line.find(tag)  # (found after output the worker printed without a newline)
            if at >= 0:
                return line[at + len(tag):].strip()

    def send(self, command):
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError, AttributeError):
            pass  # the worker is gone; expect() reports why

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


def run_worker(python, spec, threads):
    """A one-shot worker (the matmul peak): (result dict, None) or (None, error)."""
    w = Worker(python, spec, threads)
    try:
        return json.loads(w.expect("RESULT ")), None
    except (WorkerError, ValueError) as e:  # (a garbled answer: json's ValueError)
        return None, str(e)
    finally:
        w.close()


def run_in_turns(jobs, threads, rounds, per_turn, skip):
    """jobs: {name: (python, spec)}. Starts and warms up each worker alone, then runs `rounds`
    rounds in which each takes one turn of per_turn + skip units (the first skip untimed; a job's
    spec may set its own "per_turn" and "skip") while the others wait; the order rotates every
    round. Returns {name: {"values": [...], "peak_rss_mb": float, "step": numgpt's step or
    None, "numpy_first": whether the worker had NumPy loaded before numgpt}} or {name:
    {"error": str}} for a worker that failed."""
    workers, out = {}, {}
    try:
        for name, (python, spec) in jobs.items():
            w = Worker(python, spec, threads)
            try:
                w.expect("READY")
                workers[name] = w
                out[name] = {"values": []}
            except WorkerError as e:
                w.close()
                out[name] = {"error": str(e)}
        for r in range(rounds):
            names = list(workers)
            k = r % len(names) if names else 0
            for name in names[k:] + names[:k]:
                w, spec = workers[name], jobs[name][1]
                n, n_skip = spec.get("per_turn", per_turn), spec.get("skip", skip)
                w.send(f"RUN {n + n_skip} {n_skip}")
                try:
                    out[name]["values"] += json.loads(w.expect("TURN "))
                except (WorkerError, ValueError) as e:
                    w.close()
                    del workers[name]
                    out[name] = {"error": str(e)}
        for name, w in workers.items():
            w.send("END")
            try:
                result = json.loads(w.expect("RESULT "))
                out[name]["peak_rss_mb"] = result["peak_rss_mb"]
                out[name]["step"] = result.get("step")
                out[name]["numpy_first"] = result.get("numpy_first")
            except (WorkerError, ValueError, KeyError, TypeError):
                out[name]["peak_rss_mb"] = float("nan")  # its timings stand; its peak is unknown
    finally:
        for w in workers.values():
            w.close()
    return out


def median(values):
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def model_flops_per_token(cfg):
    import numgpt
    shapes = numgpt.param_shapes(cfg)
    n = sum(int(__import__("math").prod(s)) for k, s in shapes.items()
            if k not in ("tok_emb", "pos_emb"))
    return 6 * n + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,laptop,hour,mid,full")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-python", default=sys.executable,
                    help="a Python that has torch installed (default: this one)")
    ap.add_argument("--no-sample", action="store_true", help="skip the sampling benchmark")
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply the timed steps per turn")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of turns for every config (default: each config's own)")
    ap.add_argument("--numpy-first", action="store_true",
                    help="also time numgpt in a process that imports NumPy before numgpt, in "
                         "turns with the others (its step against train.py's import order)")
    args = ap.parse_args(argv)
    sys.path.insert(0, REPO)
    import numgpt  # noqa: F401
    from numgpt.env import EnvError, check_all
    try:
        check_all()  # a variable the workers could not read: one line here, not one per worker
    except EnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.rounds is not None and args.rounds < 1 or not args.steps_scale > 0:
        print("error: --rounds must be at least 1 and --steps-scale above 0", file=sys.stderr)
        return 2
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        print(f"error: unknown config(s) {', '.join(bad)}; choose from {', '.join(CONFIGS)}",
              file=sys.stderr)
        return 2
    try:
        torch_ok = subprocess.run([args.torch_python, "-c", "import torch"],
                                  capture_output=True).returncode == 0
    except OSError:  # no such interpreter, or not executable: the same as a Python without torch
        torch_ok = False
    import platform

    from numgpt.parallel import cpu
    print(f"machine: {cpu()}, {os.cpu_count()} cpus; threads {args.threads}; "
          f"python {platform.python_version()}")
    if not torch_ok:
        print(f"note: torch is not importable by {args.torch_python}; PyTorch columns are skipped "
              "(pip install torch==2.13.0, or pass --torch-python)")
    # numgpt's kernels first, in a process of their own: on a fresh clone they compile here, so
    # that no timed worker compiles during its warm-up (its peak memory would include numba's)
    from numgpt import kernels
    if not kernels.cache_is_warm():
        print("compiling numgpt's numba kernels first (once; 1-2 minutes here) ...", flush=True)
    warm, err = run_worker(sys.executable, {"kind": "warm"}, args.threads)
    if err:
        print(f"note: compiling the kernels failed ({err}); the numgpt workers will try again")
    peak, err = run_worker(sys.executable, {"kind": "peak"}, args.threads)
    peak_flops = peak["flops"] if peak else float("nan")
    print(f"float32 matmul peak (NumPy, 2048^3, {args.threads} threads): {peak_flops / 1e9:.1f} GFLOP/s")

    impls = ["numgpt"] + (["torch-explicit", "torch-sdpa"] if torch_ok else [])
    rows = []
    for name in names:
        preset, over, rounds, per_turn, skip, warm = CONFIGS[name]
        cfg = numgpt.get_config(preset, **over)
        per_turn = max(1, round(per_turn * args.steps_scale))
        rounds = args.rounds or rounds
        jobs = {impl: (sys.executable if impl == "numgpt" else args.torch_python,
                       {"kind": "train", "impl": impl, "preset": preset, "overrides": over,
                        "warmup": warm}) for impl in impls}
        if args.numpy_first:
            jobs[NUMPY_FIRST] = (sys.executable, dict(jobs["numgpt"][1], numpy_first=True))
        # the matmul peak takes a turn in every round too, so that the MFU compares the steps
        # with the peak of the same minutes (the machine's speed drifts; see the docstring)
        jobs["peak"] = (sys.executable, {"kind": "peak_turns", "per_turn": 1, "skip": 0})
        res = run_in_turns(jobs, args.threads, rounds, per_turn, skip)
        peak_res = res.pop("peak")
        peaks = peak_res.get("values") or []
        if peaks:
            print(f"  {name:<7} {'matmul peak':<15} {median(peaks) / 1e9:9.1f} GFLOP/s (median of "
                  f"{len(peaks)} turns, {min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f})")
        else:
            print(f"  {name:<7} matmul peak in turns failed ({peak_res.get('error')}); its MFU is "
                  "against the peak at the run's start and end")
        for impl in impls + ([NUMPY_FIRST] if args.numpy_first else []):
            r = res[impl]
            if "error" not in r:
                r["median_s"] = median(r["values"])
            sys.stdout.write(f"  {name:<7} {impl:<15} " + (
                f"{r['median_s'] * 1e3:9.1f} ms/step (median of {len(r['values'])}, "
                f"{rounds} turns), peak {r['peak_rss_mb']:.0f} MB"
                + (f", step {r['step']}" if r.get("step") else "") + "\n"
                if "error" not in r else f"failed: {r['error']}\n"))
            sys.stdout.flush()
        rows.append((name, cfg, res, peaks))
    # the peak again at the end: on a shared machine one measurement can come out low, and a low
    # peak would flatter the MFU; the highest of these and of the turns' is the strict reference
    peak2, _ = run_worker(sys.executable, {"kind": "peak"}, args.threads)
    if peak2 and not peak2["flops"] <= peak_flops:
        peak_flops = peak2["flops"]
    print(f"float32 matmul peak, best of the start and the end: {peak_flops / 1e9:.1f} GFLOP/s")
    highest = max([p for p in [peak_flops] + [max(peaks) for *_, peaks in rows if peaks]
                   if p == p], default=float("nan"))  # (p == p: not NaN, a failed measurement)

    print(f"\ntraining step (forward + backward + AdamW), median, {args.threads} threads; MFU "
          "against the config's matmul peak in its turns")
    print(f"{'config':<8} {'numgpt tok/s':>13} {'MFU':>5} {'peak MB':>8} | "
          f"{'torch tok/s':>11} {'MFU':>5} {'peak MB':>8} {'ratio':>6} | "
          f"{'sdpa tok/s':>10} {'ratio':>6}  (ratio = numgpt speed / torch speed)")
    strict = []
    for name, cfg, res, peaks in rows:
        tokens = cfg.batch_size * cfg.block_size
        fpt = model_flops_per_token(cfg)
        peak = median(peaks) if peaks else peak_flops

        def cols(r):
            if "median_s" not in r:
                return None
            tps = tokens / r["median_s"]
            return tps, tps * fpt / peak, r["peak_rss_mb"]
        n = cols(res["numgpt"])
        line = f"{name:<8} "
        line += f"{n[0]:>13,.0f} {n[1]:>5.0%} {n[2]:>8,.0f} | " if n else f"{'failed':>29} | "
        if n:
            strict.append(f"{name} {n[0] * fpt / highest:.0%}")
        for impl in ("torch-explicit", "torch-sdpa"):
            t = cols(res.get(impl, {}))
            if t is None:
                line += f"{'-':>11} {'':>5} {'':>8} {'-':>6} | " if impl == "torch-explicit" else f"{'-':>10} {'-':>6}"
                continue
            ratio = n[0] / t[0] if n else float("nan")
            if impl == "torch-explicit":
                line += f"{t[0]:>11,.0f} {t[1]:>5.0%} {t[2]:>8,.0f} {ratio:>5.2f}x | "
            else:
                line += f"{t[0]:>10,.0f} {ratio:>5.2f}x"
        print(line)
    if strict:
        print(f"numgpt's MFU against the run's highest matmul peak ({highest / 1e9:.1f} GFLOP/s, "
              f"start, end or any turn): {', '.join(strict)}")
    if args.numpy_first:
        print("numgpt with NumPy imported first, its step time over train.py's order's (in the "
              "same turns): " + ", ".join(
                  f"{name} {res[NUMPY_FIRST]['median_s'] / res['numgpt']['median_s']:.2f}x "
                  f"({res[NUMPY_FIRST].get('step')} vs {res['numgpt'].get('step')})"
                  if "median_s" in res[NUMPY_FIRST] and "median_s" in res["numgpt"]
                  else f"{name} failed" for name, _, res, _ in rows))

    if args.no_sample:
        return 0
    print("\nsampling, 1 sequence, context full at block_size, median of whole generate runs in "
          "turns (numgpt: key/value cache; torch: the video's generate, no cache)")
    for name, (preset, over) in SAMPLE_CONFIGS.items():
        cfg = numgpt.get_config(preset, **over)
        jobs = {"numgpt": (sys.executable, {"kind": "sample", "impl": "numgpt", "preset": preset,
                                            "overrides": over, "n_tokens": 300})}
        if torch_ok:
            jobs["torch"] = (args.torch_python, {"kind": "sample", "impl": "torch", "preset": preset,
                                                 "overrides": over,
                                                 "n_tokens": 30 if name == "full" else 200})
        res = run_in_turns(jobs, args.threads, args.rounds or SAMPLE_ROUNDS, 1, 0)
        rate = {k: median(r["values"]) for k, r in res.items() if "error" not in r}
        n_s = (f"{rate['numgpt']:,.1f} tok/s" if "numgpt" in rate
               else f"failed: {res['numgpt']['error']}")
        t_s = (f"{rate['torch']:,.1f} tok/s" if "torch" in rate
               else f"({res['torch']['error']})" if "torch" in res else "(torch missing)")
        ratio = f"{rate['numgpt'] / rate['torch']:.1f}x" if len(rate) == 2 else "-"
        print(f"  {name:<7} block {cfg.block_size}: numgpt {n_s}, torch {t_s}, ratio {ratio}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
