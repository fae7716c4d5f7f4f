"""numgpt against PyTorch's CPU build, side by side in one run: training step speed, model FLOP
utilisation, peak memory, and sampling speed.

    python bench/bench.py                                  # all configs, 2 threads
    python bench/bench.py --configs tiny,laptop --threads 2
    python bench/bench.py --torch-python /path/to/venv-with-torch/bin/python

Every measurement runs in a fresh subprocess (so peak memory is its own), one after the other,
never two at once. numgpt and PyTorch get the same config, batch, thread count and random token
ids. A training step is forward + backward + AdamW; the figure is the median over --steps steps
after warm-up; sampling speed is the median of three timed runs of a whole generate. PyTorch
runs twice: with the video's explicit attention and with
scaled_dot_product_attention. Where torch cannot be imported, its columns say so.

Model FLOP utilisation (MFU) = model FLOPs per second / the float32 matmul peak measured here with
NumPy at the same thread count (the best of a measurement before and one after the training
runs), where model FLOPs per token = 6 N + 12 L T C (N: parameters
outside the embedding tables; the attention term as nanoGPT and PaLM count it).
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

CONFIGS = {
    # name: (preset, overrides, timed steps, warm-up steps)
    # tiny steps take milliseconds: many of them, after a warm-up long enough for both sides to
    # settle (numgpt's first few hundred steps here run ~15% slower than later ones)
    "tiny": ("residual", dict(), 400, 100),
    "laptop": ("laptop", dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12), 40, 5),
    # numgpt's first mid steps run slow while its heap grows and settles (one in-process run:
    # 2150, 1299, 981, 953, 906, 856, 852, 868 ms): three warm-up steps (the same for PyTorch)
    "mid": ("scaled", dict(batch_size=8), 5, 3),
    "full": ("scaled", dict(batch_size=64), 2, 1),
}
SAMPLE_REPEATS = 3  # sampling speed: the median of this many timed runs (the machine is noisy)
SAMPLE_CONFIGS = {"full": ("scaled", dict()), "laptop": CONFIGS["laptop"][:2]}


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


def worker_numgpt_train(cfg, steps, warmup):
    import numpy as np

    import numgpt
    from numgpt.parallel import step_function
    model = numgpt.GPT(cfg, seed=0)
    opt = numgpt.make_optimizer(model)
    step, _ = step_function(model, cfg)  # what train.py uses: data-parallel threads where it pays
    rng = np.random.default_rng(0)
    x, y = _batch(cfg)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss, grads = step(x, y, rng=rng)
        numgpt.clip_grad_norm(grads, 1.0)
        opt.step(grads)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def worker_torch_train(cfg, steps, warmup, attention):
    import torch
    from torch_reference import TorchGPT
    model = TorchGPT(cfg, attention=attention).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                            eps=cfg.eps, weight_decay=cfg.weight_decay)
    x, y = (torch.as_tensor(a) for a in _batch(cfg))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def worker_numgpt_sample(cfg, n_tokens):
    import numpy as np

    import numgpt
    from numgpt.generate import generate
    model = numgpt.GPT(cfg, seed=0)
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, cfg.block_size))
    generate(model, prompt, 4, rng=np.random.default_rng(0))  # warm-up (kernels, caches)
    rates = []
    for _ in range(SAMPLE_REPEATS):
        t0 = time.perf_counter()
        generate(model, prompt, n_tokens, rng=np.random.default_rng(0))
        rates.append(n_tokens / (time.perf_counter() - t0))
    return sorted(rates)[len(rates) // 2]


def worker_torch_sample(cfg, n_tokens):
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
    rates = []
    for _ in range(SAMPLE_REPEATS):
        t0 = time.perf_counter()
        run(n_tokens)
        rates.append(n_tokens / (time.perf_counter() - t0))
    return sorted(rates)[len(rates) // 2]


def worker_matmul_peak():
    import numpy as np
    n = 2048
    a = np.random.rand(n, n).astype(np.float32)
    b = np.random.rand(n, n).astype(np.float32)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def worker_main(spec):
    sys.path.insert(0, HERE)
    sys.path.insert(0, REPO)
    import numgpt  # noqa: F401  (first: thread settings before NumPy loads)
    if spec["kind"] == "peak":
        out = {"flops": worker_matmul_peak()}
    else:
        cfg = numgpt.get_config(spec["preset"], **spec["overrides"])
        if spec["impl"].startswith("torch"):
            import torch
            torch.set_num_threads(spec["threads"])
            torch.manual_seed(0)
        if spec["kind"] == "train":
            if spec["impl"] == "numgpt":
                times = worker_numgpt_train(cfg, spec["steps"], spec["warmup"])
            else:
                times = worker_torch_train(cfg, spec["steps"], spec["warmup"],
                                           spec["impl"].split("-")[1])
            times.sort()
            out = {"median_s": times[len(times) // 2], "times": times}
        else:
            fn = worker_numgpt_sample if spec["impl"] == "numgpt" else worker_torch_sample
            out = {"tokens_per_s": fn(cfg, spec["n_tokens"])}
    out["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(out))


# ---------------------------------------------------------------- the parent: run and report

def run_worker(python, spec, threads, timeout=3600):
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[k] = str(threads)
    if spec.get("impl", "numgpt") != "numgpt":
        # the worker imports numgpt (for its thread settings) before torch; PyTorch keeps
        # glibc's own malloc settings, not the ones numgpt asks for (numgpt/_threads.py)
        env["NUMGPT_NO_MALLOPT"] = "1"
    spec = dict(spec, threads=threads)
    try:
        r = subprocess.run([python, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                           capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return None, "timed out"
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:]), None
    err = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return None, err


def model_flops_per_token(cfg):
    import numgpt
    shapes = numgpt.param_shapes(cfg)
    n = sum(int(__import__("math").prod(s)) for k, s in shapes.items()
            if k not in ("tok_emb", "pos_emb"))
    return 6 * n + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,laptop,mid,full")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-python", default=sys.executable,
                    help="a Python that has torch installed (default: this one)")
    ap.add_argument("--no-sample", action="store_true", help="skip the sampling benchmark")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply the timed steps")
    args = ap.parse_args(argv)
    sys.path.insert(0, REPO)
    import numgpt  # noqa: F401

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
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; "
          f"threads {args.threads}; python {platform.python_version()}")
    if not torch_ok:
        print(f"note: torch is not importable by {args.torch_python}; PyTorch columns are skipped "
              "(pip install torch==2.13.0, or pass --torch-python)")
    peak, err = run_worker(sys.executable, {"kind": "peak"}, args.threads)
    peak_flops = peak["flops"] if peak else float("nan")
    print(f"float32 matmul peak (NumPy, 2048^3, {args.threads} threads): {peak_flops / 1e9:.1f} GFLOP/s")

    impls = ["numgpt"] + (["torch-explicit", "torch-sdpa"] if torch_ok else [])
    rows = []
    for name in names:
        preset, over, steps, warm = CONFIGS[name]
        cfg = numgpt.get_config(preset, **over)
        steps = max(1, round(steps * args.steps_scale))
        res = {}
        for impl in impls:
            spec = {"kind": "train", "impl": impl, "preset": preset, "overrides": over,
                    "steps": steps, "warmup": warm}
            python = sys.executable if impl == "numgpt" else args.torch_python
            out, err = run_worker(python, spec, args.threads)
            res[impl] = out if out else {"error": err}
            sys.stdout.write(f"  {name:<7} {impl:<15} " + (
                f"{out['median_s'] * 1e3:9.1f} ms/step, peak {out['peak_rss_mb']:.0f} MB\n"
                if out else f"failed: {err}\n"))
            sys.stdout.flush()
        rows.append((name, cfg, res))
    # the peak again at the end: on a shared machine one measurement can come out low, and a low
    # peak would flatter the MFU; the higher of the two is used
    peak2, _ = run_worker(sys.executable, {"kind": "peak"}, args.threads)
    if peak2 and not peak2["flops"] <= peak_flops:
        peak_flops = peak2["flops"]
    print(f"float32 matmul peak, best of the start and the end: {peak_flops / 1e9:.1f} GFLOP/s")

    print(f"\ntraining step (forward + backward + AdamW), median, {args.threads} threads")
    print(f"{'config':<8} {'numgpt tok/s':>13} {'MFU':>5} {'peak MB':>8} | "
          f"{'torch tok/s':>11} {'MFU':>5} {'peak MB':>8} {'ratio':>6} | "
          f"{'sdpa tok/s':>10} {'ratio':>6}  (ratio = numgpt speed / torch speed)")
    for name, cfg, res in rows:
        tokens = cfg.batch_size * cfg.block_size
        fpt = model_flops_per_token(cfg)

        def cols(r):
            if "median_s" not in r:
                return None
            tps = tokens / r["median_s"]
            return tps, tps * fpt / peak_flops, r["peak_rss_mb"]
        n = cols(res["numgpt"])
        line = f"{name:<8} "
        line += f"{n[0]:>13,.0f} {n[1]:>5.0%} {n[2]:>8,.0f} | " if n else f"{'failed':>29} | "
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

    if args.no_sample:
        return 0
    print("\nsampling, 1 sequence, context full at block_size (numgpt: key/value cache; "
          "torch: the video's generate, no cache)")
    for name, (preset, over) in SAMPLE_CONFIGS.items():
        cfg = numgpt.get_config(preset, **over)
        r_n, e_n = run_worker(sys.executable, {"kind": "sample", "impl": "numgpt", "preset": preset,
                                               "overrides": over, "n_tokens": 300}, args.threads)
        r_t, e_t = (run_worker(args.torch_python, {"kind": "sample", "impl": "torch", "preset": preset,
                                                   "overrides": over, "n_tokens": 30 if name == "full" else 200},
                               args.threads) if torch_ok else (None, "torch missing"))
        n_s = f"{r_n['tokens_per_s']:,.1f} tok/s" if r_n else f"failed: {e_n}"
        t_s = f"{r_t['tokens_per_s']:,.1f} tok/s" if r_t else f"({e_t})"
        ratio = f"{r_n['tokens_per_s'] / r_t['tokens_per_s']:.1f}x" if r_n and r_t else "-"
        print(f"  {name:<7} block {cfg.block_size}: numgpt {n_s}, torch {t_s}, ratio {ratio}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
