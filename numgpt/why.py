"""Two measurements behind two choices of the model, at initialisation (docs/ladder.md quotes them):

    python -m numgpt.why            # prints both tables; writes nothing

1. Why the scores are scaled by 1/sqrt(head size): with the scale the attention softmax starts
   spread out; without it, it starts saturated (close to one-hot), where its Jacobian
   p_j (delta_jk - p_k) is close to 0 and little gradient gets through to q and k.
2. Pre-norm against post-norm: at initialisation, the gradient of each block's parameters, and the
   gradient of the residual stream between the blocks. With pre-norm the stream's gradient never
   passes through a LayerNorm on the way down (only additions), so it never shrinks; with
   post-norm every block's LayerNorm backward rescales it.

Everything runs the NumPy reference layers in float64 on random token ids from fixed seeds, so the
numbers are the same on every machine (to the last printed digit, up to BLAS summation order).
"""
import sys

import numpy as np

from .config import ConfigError, get_config

HELP = """usage: python -m numgpt.why [--seeds=N] [--quick]

Prints (1) the attention softmax's saturation at initialisation with and without the
1/sqrt(head size) scale and (2) the per-block gradient norms at initialisation of post-norm against
pre-norm. Writes no file.
  --seeds=N   model seeds averaged over (default 5)
  --quick     small sizes (what the test runs)
"""

SAT_THRESHOLD = 0.99  # a row whose largest probability is above this is "saturated"


def softmax_stats(s):
    """Saturation of causal softmax rows. s: [..., T, T] scores (unmasked; the mask is applied here).

    Rows i >= 1 only (row 0 sees one key and is always [1]). Returns a dict:
      entropy: mean of H(p_i) / ln(i + 1): 1 = uniform over the visible keys, 0 = one-hot
      max_p:   mean of max_j p_ij
      saturated: share of rows with max_j p_ij > SAT_THRESHOLD (there every Jacobian entry
                 p_j (delta_jk - p_k) is below 1 - SAT_THRESHOLD)
    """
    T = s.shape[-1]
    s = np.where(np.triu(np.ones((T, T), bool), k=1), -np.inf, s)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    p = p[..., 1:, :]                                      # rows 1 .. T-1
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    ent = -plogp.sum(axis=-1) / np.log(np.arange(2, T + 1))
    pmax = p.max(axis=-1)
    return {"entropy": float(ent.mean()), "max_p": float(pmax.mean()),
            "saturated": float((pmax > SAT_THRESHOLD).mean())}


def unit_qk_saturation(hs, T, n_rows, seed=0):
    """q, k with N(0, 1) entries (the textbook assumption): stats of q k^T with and without
    1/sqrt(hs), and the std of the unmasked scores."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n_rows, T, hs))
    k = rng.standard_normal((n_rows, T, hs))
    raw = q @ k.swapaxes(-1, -2)
    return {"std_raw": float(raw.std()), "std_scaled": float((raw / np.sqrt(hs)).std()),
            "scaled": softmax_stats(raw / np.sqrt(hs)), "unscaled": softmax_stats(raw)}


def model_qk(cfg, ids, seed):
    """The q and k of every block of a freshly initialised model on ids: list of (q, k), each
    [B, H, T, hs], read from the forward cache of the reference layers (float64)."""
    from .model import GPT
    model = GPT(cfg.replace(kernels=False, dropout=0.0), seed=seed, dtype=np.float64)
    _, cache = model.forward(ids)
    return [(bc["attn"][3][0], bc["attn"][3][1]) for bc in cache["blocks"]]


def model_saturation(cfg, batch, seeds):
    """Per block, averaged over seeds: softmax stats of the model's own q k^T with and without the
    scale. The q, k are those of the model as it is (scaled), so from block 1 on both columns see
    the same inputs and differ only in the softmax of that block."""
    rows = []
    for seed in seeds:
        ids = np.random.default_rng(1000 + seed).integers(0, cfg.vocab_size, (batch, cfg.block_size))
        for i, (q, k) in enumerate(model_qk(cfg, ids, seed)):
            raw = q @ k.swapaxes(-1, -2)
            rows.append((i, float(raw.std()), softmax_stats(raw / np.sqrt(q.shape[-1])),
                         softmax_stats(raw)))
    out = []
    for i in range(cfg.n_layer):
        mine = [r for r in rows if r[0] == i]
        avg = lambda j, key: float(np.mean([r[j][key] for r in mine]))  # noqa: E731
        out.append({"block": i, "std_raw": float(np.mean([r[1] for r in mine])),
                    "scaled": {key: avg(2, key) for key in ("entropy", "max_p", "saturated")},
                    "unscaled": {key: avg(3, key) for key in ("entropy", "max_p", "saturated")}})
    return out


def block_grads(cfg, batch, seed):
    """At initialisation, on random ids and targets: (param, stream), each [n_layer] float64.

    param[i]:  the L2 norm of the gradient of all of block i's parameters as one vector
    stream[i]: the L2 norm of the gradient dx of the residual stream entering block i (dx of the
               embeddings for i = 0), divided by the one entering the final LayerNorm/lm_head
    zero_head stays off (as in the rungs): with a zero lm_head no gradient reaches the blocks at
    step 0. The
    backward is GPT.backward's, step by step, to read dx between the blocks.
    """
    from .layers import linear_backward
    from .model import GPT
    cfg = cfg.replace(kernels=False, dropout=0.0, zero_head=False)
    model = GPT(cfg, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(2000 + seed)
    x = rng.integers(0, cfg.vocab_size, (batch, cfg.block_size))
    y = rng.integers(0, cfg.vocab_size, (batch, cfg.block_size))
    logits, cache = model.forward(x)
    _, dlogits = model.ops.cross_entropy(logits, y)
    dx, _, _ = linear_backward(dlogits, cache["head"])
    if cache["ln_f"] is not None:
        dx, _, _ = model.ops.layernorm_backward(dx, cache["ln_f"])
    top = np.linalg.norm(dx)
    grads, stream = {}, [0.0] * cfg.n_layer
    for i in reversed(range(cfg.n_layer)):
        dx = model._block_backward(dx, i, cache["blocks"][i], grads)
        stream[i] = np.linalg.norm(dx) / top
    param = [np.sqrt(sum(float((g * g).sum()) for k, g in grads.items()
                         if k.startswith(f"blocks.{i}."))) for i in range(cfg.n_layer)]
    return np.array(param), np.array(stream)


def grad_norm_table(base, n_layers, batch, seeds):
    """{(norm, n_layer): (param, stream) means over seeds} for post-norm and pre-norm."""
    out = {}
    for norm in ("post", "pre"):
        for L in n_layers:
            cfg = get_config(base, norm=norm, n_layer=L)
            runs = [block_grads(cfg, batch, s) for s in seeds]
            out[(norm, L)] = (np.mean([r[0] for r in runs], axis=0),
                              np.mean([r[1] for r in runs], axis=0))
    return out


def spread(norms):
    """max / min of the per-block norms: 1 = every block gets the same gradient."""
    return float(norms.max() / norms.min())


def measure(quick=False, seeds=5):
    seeds = list(range(seeds))
    if quick:
        unit = [(8, 16), (64, 16)]
        sat_rungs = [("preln", {}), ("scaled", dict(n_layer=2, n_embd=128, n_head=2,
                                                    block_size=32))]
        depth, batch, sat_batch = [3, 6], 8, 2
    else:
        unit = [(8, 8), (16, 64), (64, 256)]
        sat_rungs = [("preln", {}), ("scaled", {})]
        depth, batch, sat_batch = [3, 12], 32, 4
    res = {"unit": [(hs, T, unit_qk_saturation(hs, T, n_rows=64)) for hs, T in unit],
           "models": [], "grads": None}
    for name, over in sat_rungs:
        cfg = get_config(name, **over)
        res["models"].append((name, cfg, model_saturation(cfg, sat_batch, seeds)))
    res["grads"] = grad_norm_table("preln", depth, batch, seeds)
    res["grad_setup"] = (depth, batch, seeds)
    return res


def _fmt_stats(st):
    return f"{st['entropy']:.3f} | {st['max_p']:.3f} | {100 * st['saturated']:.1f}%"


def report(res, out=sys.stdout):
    w = out.write
    w("1. The attention softmax at initialisation, with and without the 1/sqrt(hs) scale\n")
    w(f"(entropy: mean H(p)/ln(visible keys), 1 = uniform, 0 = one-hot; max p: mean of the row "
      f"maxima; saturated: rows with max p > {SAT_THRESHOLD}; rows 1..T-1)\n\n")
    w("a) q and k with N(0, 1) entries, 64 sequences\n\n")
    w("| hs | T | score std with / without | entropy with | max p with | saturated with "
      "| entropy without | max p without | saturated without |\n")
    w("|---:|---:|---|---:|---:|---:|---:|---:|---:|\n")
    for hs, T, r in res["unit"]:
        w(f"| {hs} | {T} | {r['std_scaled']:.2f} / {r['std_raw']:.2f} | {_fmt_stats(r['scaled'])} "
          f"| {_fmt_stats(r['unscaled'])} |\n")
    for name, cfg, rows in res["models"]:
        w(f"\nb) the {name} rung at init (n_embd {cfg.n_embd}, {cfg.n_head} heads of "
          f"{cfg.head_size}, T {cfg.block_size}, init {cfg.init}), the model's own q and k, "
          f"mean of {len(res['grad_setup'][2])} seeds\n\n")
        w("| block | q·k std | entropy with | max p with | saturated with | entropy without "
          "| max p without | saturated without |\n")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        for r in rows:
            w(f"| {r['block']} | {r['std_raw']:.3f} | {_fmt_stats(r['scaled'])} | "
              f"{_fmt_stats(r['unscaled'])} |\n")
    depth, batch, seeds = res["grad_setup"]
    w(f"\n2. Gradient norms at initialisation, post-norm against pre-norm\n"
      f"(the preln rung's sizes and init with norm=post or pre, zero_head off, batch {batch} of "
      f"random ids and targets, mean of {len(seeds)} seeds; block 0 is nearest the input)\n\n")
    w("a) the gradient of each block's parameters (L2 norm over all of them)\n\n")
    w("| norm | layers | block 0, 1, ... | max/min |\n|---|---:|---|---:|\n")
    for (norm, L), (g, _) in res["grads"].items():
        w(f"| {norm} | {L} | {', '.join(f'{v:.4f}' for v in g)} | {spread(g):.2f} |\n")
    w("\nb) the gradient of the residual stream entering each block (block 0: the embeddings), "
      "relative to the one leaving the last block\n\n")
    w("| norm | layers | block 0, 1, ... |\n|---|---:|---|\n")
    for (norm, L), (_, st) in res["grads"].items():
        w(f"| {norm} | {L} | {', '.join(f'{v:.3f}' for v in st)} |\n")
    return res


def main(argv):
    from .cli import parse_flags
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return 0
    opts = parse_flags(argv, {"seeds"}, flags=("quick",))
    try:
        seeds = int(opts.get("seeds", 5))
    except ValueError:
        raise ConfigError(f"--seeds must be a whole number from 1 to 100, got {opts['seeds']!r}") \
            from None
    if not 1 <= seeds <= 100:
        raise ConfigError(f"--seeds must be a whole number from 1 to 100, got {seeds}")
    report(measure(quick=bool(opts.get("quick")), seeds=seeds))
    return 0


if __name__ == "__main__":
    from .cli import run
    sys.exit(run(main))
