"""Finite-difference gradient checking (central differences, float64), and the report of every check.

rel_error(a, n) = ||a - n|| / max(||a|| + ||n||, tiny), the norms taken over a whole tensor (or over
the sampled entries of it), so an entry whose true gradient is ~0 cannot blow the ratio up.
See docs/derivations.md#gradient-checking.

    python -m numgpt.gradcheck [--preset NAME ...] [--layer NAME ...] [--break BUG] [--list-bugs]

prints one line per layer (or preset) and parameter tensor: its shape, the analytic gradient's
norm, the relative error against central differences and pass or fail, then the seconds taken.
With no --layer and no --preset it checks every layer, AdamW's update and every preset. --break
BUG plants one mistake from the catalogue in numgpt/bugs.py for the run and names the lines that
catch it. Exit status: 0 when every check passes (with --break: when the planted bug is caught),
1 otherwise, 2 for bad arguments.
"""
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

LAYER_TOL = 1e-6   # a single layer in float64: round-off gives 1e-11 .. 1e-9
MODEL_TOL = 1e-6   # a whole model: 1e-10 .. 1e-7 at the report's sizes
ADAMW_TOL = 1e-10  # AdamW against its closed form: no differences taken, only round-off


def rel_error(a, n, tiny=1e-30):
    a = np.asarray(a, dtype=np.float64).ravel()
    n = np.asarray(n, dtype=np.float64).ravel()
    return float(np.linalg.norm(a - n) / max(np.linalg.norm(a) + np.linalg.norm(n), tiny))


def numeric_grad(f, x, h=1e-6, indices=None):
    """Central differences of the scalar function f() with respect to the array x, perturbed in place.

    indices: flat indices to check (all when None); returns the numeric gradient at those entries.
    x must be a writeable C-contiguous array that f reads (a ValueError otherwise): x is perturbed
    through x.reshape(-1), which for any other layout is a copy that f would never see.
    """
    x = np.asarray(x)
    if not x.flags.c_contiguous:
        raise ValueError("numeric_grad perturbs x through a flat view, so x must be C-contiguous; "
                         "this array is a non-contiguous view (a transpose or a strided slice): "
                         "pass np.ascontiguousarray(x) and let f read that same array")
    if not x.flags.writeable:
        raise ValueError("numeric_grad perturbs x in place, so x must be writeable")
    flat = x.reshape(-1)
    if indices is None:
        indices = range(flat.size)
    out = []
    for i in indices:
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        out.append((fp - fm) / (2 * h))
    return np.array(out)


def sample_indices(size, k, rng):
    """Up to k distinct flat indices of a tensor of `size` entries (all of them when size <= k)."""
    if size <= k:
        return np.arange(size)
    return np.sort(rng.choice(size, k, replace=False))


def check_model_grads(model, x, y, train=True, seed=0, per_tensor=20, h=1e-6, sample_seed=0,
                      tiny=1e-30):
    """Relative error of model.loss_and_grads against central differences of model.loss, per tensor.

    Dropout masks are replayed by handing every evaluation a Generator with the same seed.
    Returns dict name -> relative error over `per_tensor` sampled entries of that tensor (inf for
    a gradient whose shape is not its parameter's).
    tiny: the smallest gradient norm errors are measured against. Central differences carry a
    rounding error of about 1e-16 * |loss| / h per entry, so sampled entries whose true gradient
    is smaller than ~1e-8 cannot be checked to 1e-4 relative; tiny=1e-4 turns the check of such
    entries into an absolute one (error below 1e-8).
    """
    rows = model_grads(model, x, y, train, seed, per_tensor, h, sample_seed)
    # a gradient of the wrong shape counts as wrong everywhere
    return {name: rel_error(a, n, tiny) if a is not None else float("inf")
            for name, (_, a, n) in rows.items()}


def model_grads(model, x, y, train=True, seed=0, per_tensor=20, h=1e-6, sample_seed=0):
    """name -> (full analytic gradient, its sampled entries, the numeric gradient at those entries).

    The sampled entries are `per_tensor` flat indices of each parameter tensor (all when smaller).
    An analytic gradient whose shape differs from its parameter's is returned as it is, with
    sampled entries None.
    """
    if model.dtype != np.float64:
        raise ValueError("gradient checks need a float64 model")
    _, grads = model.loss_and_grads(x, y, train=train, rng=np.random.default_rng(seed))
    pick = np.random.default_rng(sample_seed)

    def f():
        return model.loss(x, y, train=train, rng=np.random.default_rng(seed))

    out = {}
    for name, p in model.params.items():
        ix = sample_indices(p.size, per_tensor, pick)
        num = numeric_grad(f, p, h, ix)
        g = np.asarray(grads[name])
        out[name] = (g, g.reshape(-1)[ix] if g.shape == p.shape else None, num)
    return out


def layer_grads(forward, backward, arrays, seed=0, h=1e-6):
    """(analytic, numeric): dicts name -> gradient of sum(out * dout) for every input array.

    forward(**arrays) -> (out, cache);  backward(dout, cache) -> dict name -> gradient.
    dout is a fixed standard-normal array of the output's shape, so every output entry matters.
    numeric holds the central differences of every entry of every array that analytic names.
    """
    out, cache = forward(**arrays)
    dout = np.random.default_rng(seed).standard_normal(np.shape(out))
    analytic = backward(dout, cache)

    def f():
        return float(np.sum(forward(**arrays)[0] * dout))

    return analytic, {name: numeric_grad(f, arrays[name], h) for name in analytic}


def check_layer(forward, backward, arrays, seed=0, h=1e-6):
    """Relative error of a layer's backward against central differences, for every input array.

    forward(**arrays) -> (out, cache);  backward(dout, cache) -> dict name -> gradient.
    The scalar checked is sum(out * dout) with a fixed random dout, so every output entry matters.
    Returns dict name -> relative error over all entries of that array.
    """
    analytic, numeric = layer_grads(forward, backward, arrays, seed, h)
    return {name: rel_error(analytic[name], numeric[name]) for name in analytic}


# ---------------------------------------------------------------------------------------------
# The report: every layer in isolation, AdamW's update, every preset's whole model
# ---------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the report: one tensor of one layer, preset or optimizer."""
    kind: str            # "layer", "optimizer" or "preset"
    name: str            # the layer, "adamw", or the preset
    tensor: str          # the input or parameter the gradient is of ("" when the check crashed)
    shape: tuple
    norm: float          # the analytic gradient's norm (for adamw: the update's)
    error: float         # relative error (nan when it could not be measured)
    tol: float
    note: str = ""       # why it failed when no error could be measured

    @property
    def passed(self):
        return not self.note and self.error <= self.tol


def _rnd(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


B, T, C = 2, 5, 6  # the layers' test shapes


def _case_embedding():
    from .layers import embedding_backward, embedding_forward
    idx = np.random.default_rng(1).integers(0, 7, (B, T))
    idx[0, :3] = 2  # repeated ids: their gradients must add up
    return (lambda W: embedding_forward(idx, W), lambda d, c: {"W": embedding_backward(d, c)},
            {"W": _rnd(7, C)})


def _case_position():
    from .layers import position_backward, position_forward

    def fwd(P):
        pos, c = position_forward(T, P)
        return np.broadcast_to(pos, (B, T, C)) * 1.0, c
    return fwd, lambda d, c: {"P": position_backward(d, c)}, {"P": _rnd(T + 3, C)}


def _case_linear():
    from .layers import linear_backward, linear_forward

    def bwd(d, c):
        dx, dW, db = linear_backward(d, c)
        return {"x": dx, "W": dW, "b": db}
    return linear_forward, bwd, {"x": _rnd(B, T, C), "W": _rnd(C, 4, seed=1), "b": _rnd(4, seed=2)}


def _case_relu():
    from .layers import relu_backward, relu_forward
    x = _rnd(B, T, C)
    x[np.abs(x) < 1e-2] = 0.5  # inputs away from the kink at 0
    return relu_forward, lambda d, m: {"x": relu_backward(d, m)}, {"x": x}


def _case_gelu():
    from .layers import gelu_backward, gelu_forward
    return gelu_forward, lambda d, c: {"x": gelu_backward(d, c)}, {"x": _rnd(B, T, C) * 3}


def _case_layernorm():
    from .layers import layernorm_backward, layernorm_forward

    def bwd(d, c):
        dx, dg, db = layernorm_backward(d, c)
        return {"x": dx, "g": dg, "b": db}
    return layernorm_forward, bwd, {"x": _rnd(B, T, C) * 2 + 1, "g": _rnd(C, seed=1),
                                    "b": _rnd(C, seed=2)}


def _case_dropout():
    from .layers import dropout_backward, dropout_forward
    p = 0.3
    mask = np.random.default_rng(5).random((B, T, C)) >= p
    return (lambda x: dropout_forward(x, p, mask=mask),
            lambda d, c: {"x": dropout_backward(d, c)}, {"x": _rnd(B, T, C)})


def _case_cross_entropy():
    from .layers import cross_entropy_backward, cross_entropy_forward
    targets = np.random.default_rng(2).integers(0, 9, (B, T))

    def fwd(logits):
        loss, cache = cross_entropy_forward(logits, targets)
        return np.array(loss), cache
    # the loss is a scalar: dout is one number, handed to the backward as dloss
    return fwd, lambda d, c: {"logits": cross_entropy_backward(c, float(d))}, {"logits": _rnd(B, T, 9)}


def _case_residual():
    from .layers import linear_backward, linear_forward, residual_backward, residual_forward
    W = _rnd(C, C, seed=3)

    def fwd(x):  # y = x + f(x) with f(x) = x W
        fx, c = linear_forward(x, W)
        return residual_forward(x, fx), c

    def bwd(d, c):
        dskip, dfx = residual_backward(d)
        return {"x": dskip + linear_backward(dfx, c)[0]}
    return fwd, bwd, {"x": _rnd(B, T, C)}


def _case_attention():
    from .layers import attention_backward, attention_forward

    def fwd(q, k, v):  # two heads, dropout on the attention weights with a replayed mask
        return attention_forward(q, k, v, 0.3, np.random.default_rng(11))

    def bwd(d, c):
        dq, dk, dv = attention_backward(d, c)
        return {"q": dq, "k": dk, "v": dv}
    return fwd, bwd, {n: _rnd(B, 2, T, 4, seed=s) for s, n in enumerate("qkv")}


def _case_multihead():
    from .layers import multihead_backward, multihead_forward
    names = ["x", "w_q", "w_k", "w_v", "w_proj", "b_proj"]
    arrays = {n: _rnd(B, T, C, seed=i) if n == "x" else
              _rnd(*((C,) if n.startswith("b") else (C, C)), seed=i) for i, n in enumerate(names)}

    def fwd(x, **params):
        return multihead_forward(x, params, 2, 0.25, 0.25, np.random.default_rng(7))

    def bwd(d, c):
        dx, g = multihead_backward(d, c)
        return {"x": dx, **g}
    return fwd, bwd, arrays


def _case_feedforward():
    from .layers import feedforward_backward, feedforward_forward
    F = 10
    arrays = {"x": _rnd(B, T, C), "w_fc": _rnd(C, F, seed=1), "b_fc": _rnd(F, seed=2),
              "w_out": _rnd(F, C, seed=3), "b_out": _rnd(C, seed=4)}

    def fwd(x, **params):
        return feedforward_forward(x, params, "gelu", 0.2, np.random.default_rng(3))

    def bwd(d, c):
        dx, g = feedforward_backward(d, c)
        return {"x": dx, **g}
    return fwd, bwd, arrays


# the layers in the order a learner writes them: each uses only layers above it
LAYERS = {
    "linear": _case_linear, "relu": _case_relu, "gelu": _case_gelu, "layernorm": _case_layernorm,
    "dropout": _case_dropout, "embedding": _case_embedding, "position": _case_position,
    "cross_entropy": _case_cross_entropy, "residual": _case_residual,
    "attention": _case_attention, "multihead": _case_multihead, "feedforward": _case_feedforward,
}
OPTIMIZERS = ["adamw"]


def _fail_note(e):
    """The one-line reason a check crashed, with where: the deepest line of the traceback in
    code of one's own (not NumPy's or another installed library's)."""
    if isinstance(e, NotImplementedError):
        return f"not written yet ({e})" if str(e) else "not written yet"
    said = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return said + _where(e)


def _where(e):
    """' (at linear.py:31)' for the deepest frame of e's traceback outside installed libraries and
    Python itself, or ''."""
    last, tb = None, e.__traceback__
    libraries = (os.path.dirname(os.__file__), os.path.dirname(np.__file__), "site-packages")
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename
        if not path.startswith("<") and not any(lib in path for lib in libraries):
            last = (path, tb.tb_lineno)
        tb = tb.tb_next
    return f" (at {os.path.basename(last[0])}:{last[1]})" if last else ""


def _not_finite(a):
    """The note for a gradient that holds NaN or inf, else None."""
    a = np.asarray(a)
    if np.issubdtype(a.dtype, np.number) and not np.all(np.isfinite(a)):
        return "the gradient holds NaN or inf"
    return None


def check_layer_rows(name, seed=0):
    """The report's rows of one layer: its backward against central differences, per input."""
    try:
        forward, backward, arrays = LAYERS[name]()
        analytic, numeric = layer_grads(forward, backward, arrays, seed)
    except Exception as e:  # a learner's backward may raise anything: report it, go on
        return [Row("layer", name, "", (), np.nan, np.nan, LAYER_TOL, _fail_note(e))]
    rows = []
    for t in arrays:
        want = np.shape(arrays[t])
        if t not in analytic:
            rows.append(Row("layer", name, t, want, np.nan, np.nan, LAYER_TOL,
                            "no gradient returned"))
            continue
        a = analytic[t]
        if a is None or np.shape(a) != want:
            got = None if a is None else np.shape(a)
            rows.append(Row("layer", name, t, want, np.nan, np.nan, LAYER_TOL,
                            f"gradient has shape {got}, the {t} it is of has {want}"))
            continue
        if _not_finite(a):
            rows.append(Row("layer", name, t, want, np.nan, np.nan, LAYER_TOL, _not_finite(a)))
            continue
        rows.append(Row("layer", name, t, want, float(np.linalg.norm(a)),
                        rel_error(a, numeric[t]), LAYER_TOL))
    return rows


def check_adamw_rows(steps=3):
    """AdamW's update against the closed form of decoupled decay, written out here step by step:
    w <- w - lr * (m_hat / (sqrt(v_hat) + eps) + wd * w) for matrices, no wd for vectors."""
    from .optim import AdamW
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    start = {k: v.copy() for k, v in params.items()}
    ref = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.99, 1e-8, 0.1
    try:
        opt = AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, use_kernels=False)
        for t in range(1, steps + 1):
            grads = {k: rng.standard_normal(p.shape) for k, p in params.items()}
            opt.step(grads)
            for k, g in grads.items():
                m[k] = b1 * m[k] + (1 - b1) * g
                v2[k] = b2 * v2[k] + (1 - b2) * g * g
                m_hat, v_hat = m[k] / (1 - b1 ** t), v2[k] / (1 - b2 ** t)
                decay = wd * ref[k] if ref[k].ndim >= 2 else 0.0
                ref[k] = ref[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + decay)
    except Exception as e:
        return [Row("optimizer", "adamw", "", (), np.nan, np.nan, ADAMW_TOL, _fail_note(e))]
    rows = []
    for k in params:
        want, got = ref[k] - start[k], params[k] - start[k]
        rows.append(Row("optimizer", "adamw", k, params[k].shape, float(np.linalg.norm(want)),
                        rel_error(got, want), ADAMW_TOL))
    return rows


SMALL_SIZE = "vocabulary 11, block 6, n_embd 12, 1 or 2 blocks"  # small_model's, as the report says


def small_model(preset, **overrides):
    """A preset shrunk so that a float64 check of the whole model takes a fraction of a second:
    vocabulary 11, block 6, n_embd 12 (1 or 3 heads), 1 or 2 blocks, dropout on, NumPy layers,
    every parameter moved off its initial value (so no gradient is trivially zero)."""
    from . import PRESETS, build_model
    over = dict(vocab_size=11, block_size=6, kernels=False)
    if PRESETS[preset].get("model") != "bigram":
        over.update(n_embd=12, n_head=1 if preset == "single_head" else 3,
                    n_layer=2 if PRESETS[preset].get("n_layer", 1) > 1 else 1,
                    dropout=PRESETS[preset].get("dropout") or 0.1)
    if PRESETS[preset].get("init") == "normal":
        over["init_std"] = 0.3  # GPT-2's 0.02 makes w_q, w_k gradients ~1e-5: too close to round-off
    over.update(overrides)
    m = build_model(preset, dtype=np.float64, seed=3, **over)
    rng = np.random.default_rng(11)
    m.set_params({k: v + 0.5 * (v.std() or 0.1) * rng.standard_normal(v.shape)
                  for k, v in m.params.items()})
    return m


def check_preset_rows(preset, per_tensor=20):
    """The report's rows of one preset's whole model, one per parameter tensor (sampled entries)."""
    try:
        m = small_model(preset)
        rng = np.random.default_rng(0)
        x = rng.integers(0, m.cfg.vocab_size, (3, m.cfg.block_size))
        y = rng.integers(0, m.cfg.vocab_size, (3, m.cfg.block_size))
        grads = model_grads(m, x, y, train=True, seed=5, per_tensor=per_tensor)
    except Exception as e:
        return [Row("preset", preset, "", (), np.nan, np.nan, MODEL_TOL, _fail_note(e))]
    rows = []
    for name, (g, a, n) in grads.items():
        shape = m.params[name].shape
        if a is None:
            rows.append(Row("preset", preset, name, shape, np.nan, np.nan, MODEL_TOL,
                            f"gradient has shape {g.shape}, the parameter {shape}"))
        elif _not_finite(g):
            rows.append(Row("preset", preset, name, shape, np.nan, np.nan, MODEL_TOL,
                            _not_finite(g)))
        else:
            rows.append(Row("preset", preset, name, shape, float(np.linalg.norm(g)),
                            rel_error(a, n), MODEL_TOL))
    return rows


def presets():
    """Every preset the report can check: the ladder, then the others."""
    from . import LADDER, PRESETS
    return LADDER + [p for p in PRESETS if p not in LADDER]


def run_report(layers=(), presets_=(), optimizers=(), out=None, hint=None):
    """Run the named checks, printing one line per tensor to out (None: print nothing).

    hint(row_name, rows) -> str or None: a line printed under a failing layer or preset.
    Returns the list of Rows.
    """
    rows = []
    jobs = ([(n, lambda n=n: check_layer_rows(n)) for n in layers]
            + [(n, check_adamw_rows) for n in optimizers]
            + [(n, lambda n=n: check_preset_rows(n)) for n in presets_])
    if out is not None:
        print(f"{'check':<26} {'tensor':<20} {'shape':<12} {'|grad|':>9} {'rel error':>9}  "
              f"{'result':<6} {'s':>5}", file=out)
    for name, job in jobs:
        t0 = time.perf_counter()
        these = job()
        secs = time.perf_counter() - t0
        rows += these
        if out is None:
            continue
        for i, r in enumerate(these):
            label = f"{r.kind} {r.name}" if i == 0 else ""
            shape = "x".join(map(str, r.shape)) if r.shape else "-"
            norm = "-" if np.isnan(r.norm) else f"{r.norm:9.3g}"
            err = "-" if np.isnan(r.error) else f"{r.error:9.1e}"
            secs_s = f"{secs:5.2f}" if i == 0 else ""
            print(f"{label:<26} {r.tensor:<20} {shape:<12} {norm:>9} {err:>9}  "
                  f"{'pass' if r.passed else 'FAIL':<6} {secs_s:>5}"
                  + (f"  {r.note}" if r.note else ""), file=out)
        if hint is not None and not all(r.passed for r in these):
            h = hint(name, these)
            if h:
                print(f"{'':<26} hint: {h}", file=out)
    return rows


def summary(rows):
    """One line: how many tensors passed, the largest error of the passing ones per kind."""
    parts = []
    for kind in ("layer", "optimizer", "preset"):
        mine = [r for r in rows if r.kind == kind]
        if not mine:
            continue
        ok = [r.error for r in mine if r.passed]
        rng = f", errors {min(ok):.0e} .. {max(ok):.0e}" if ok else ""
        parts.append(f"{kind}s: {len(ok)}/{len(mine)} tensors pass{rng}")
    return "; ".join(parts)


def stdout_closed_quietly(fn):
    """fn(argv) with a reader that stops early (| head) ending the command without a traceback."""
    def run(argv=None):
        try:
            return fn(argv)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush goes nowhere
            return 1
    run.__doc__ = fn.__doc__
    return run


@stdout_closed_quietly
def main(argv=None):
    from . import bugs
    from .cli import OneLineParser
    ap = OneLineParser(prog="python -m numgpt.gradcheck",
                       description="Gradient checks of every layer, AdamW and every preset, in float64.")
    ap.add_argument("--layer", action="extend", nargs="+", default=[], metavar="NAME",
                    help="layers to check: " + ", ".join(list(LAYERS) + OPTIMIZERS))
    ap.add_argument("--preset", action="extend", nargs="+", default=[], metavar="NAME",
                    help="presets whose whole model to check: " + ", ".join(presets()))
    ap.add_argument("--break", dest="bug", metavar="BUG", default=None,
                    help="plant one bug from the catalogue for this run (see --list-bugs)")
    ap.add_argument("--list-bugs", action="store_true", help="list the catalogue of bugs and exit")
    args = ap.parse_args(argv)
    if args.list_bugs:
        for name, bug in bugs.CATALOGUE.items():
            print(f"{name:<22} {bug.title}")
        return 0
    for n in args.layer:
        if n not in LAYERS and n not in OPTIMIZERS:
            ap.error(f"unknown layer {n!r}; choose from {', '.join(list(LAYERS) + OPTIMIZERS)}")
    for n in args.preset:
        if n not in presets():
            ap.error(f"unknown preset {n!r}; choose from {', '.join(presets())}")
    if args.bug is not None and args.bug not in bugs.CATALOGUE:
        ap.error(f"unknown bug {args.bug!r}; choose from {', '.join(bugs.CATALOGUE)}")
    if not args.layer and not args.preset:
        layers, opts, pres = list(LAYERS), OPTIMIZERS, presets()
    else:
        layers = [n for n in args.layer if n in LAYERS]
        opts = [n for n in args.layer if n in OPTIMIZERS]
        pres = args.preset
    t0 = time.perf_counter()
    if args.bug is None:
        rows = run_report(layers, pres, opts, out=sys.stdout)
    else:
        bug = bugs.CATALOGUE[args.bug]
        print(f"planted: {args.bug}: {bug.title}")
        with bugs.plant(args.bug):
            rows = run_report(layers, pres, opts, out=sys.stdout)
    if pres:
        print(f"(each preset's whole model at a small size, {SMALL_SIZE}: its structure, not its "
              "size)")
    print(f"\n{summary(rows)}; float64, {time.perf_counter() - t0:.1f} s")
    failed = sorted({f"{r.kind} {r.name}" for r in rows if not r.passed},
                    key=lambda s: [f"{r.kind} {r.name}" for r in rows].index(s))
    if args.bug is not None:
        if failed:
            print(f"caught {args.bug} in: {', '.join(failed)}")
            return 0
        print(f"{args.bug} was NOT caught by the checks run; it shows in: "
              f"{', '.join(bugs.CATALOGUE[args.bug].caught_by)}")
        return 1
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
