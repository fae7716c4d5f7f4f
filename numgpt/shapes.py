"""The shape of every tensor, cache entry and gradient through the whole model, measured.

    python -m numgpt.shapes                      # the preln rung: B 32, T 8, C 32, 4 heads, V 65
    python -m numgpt.shapes --preset=laptop --T=16

Runs one forward and one backward of the NumPy reference layers (kernels off, float64) on random
ids and walks them step by step, in the order of GPT.forward / GPT.backward, reading each array
from the forward caches or from the layer functions. Every row's symbolic shape is evaluated with
the config's sizes and checked against the real array; a mismatch is an error. Prints markdown
tables (docs/shapes.md holds the output for the preln rung). Block 0 stands for every block.
"""
import sys

import numpy as np

from .config import FIELDS, ConfigError, get_config
from .layers import cross_entropy_forward, linear_backward
from .layers.activations import ACTIVATIONS
from .layers.attention import merge_heads as _merge, split_heads as _split

HELP = """usage: python -m numgpt.shapes [--preset=NAME] [--T=N] [--key=value ...]

Prints the shape of every tensor, cache entry and gradient of one forward and backward pass of the
model of a preset (default preln; or scaled, laptop, hour: the pre-norm presets), measured on the
reference layers. --T is the sequence length (default block_size); --key=value overrides a config
field (e.g. --batch_size=2).
"""


class Table:
    def __init__(self, dims):
        self.dims = dims
        self.sections = []

    def section(self, title, header):
        self.sections.append((title, header, []))

    def add(self, name, sym, arr, note=""):
        """A row; sym like 'B, T, C' (or '' for a scalar) must give arr's shape with self.dims."""
        want = tuple(eval(d, {}, self.dims) for d in sym.split(",")) if sym.strip() else ()
        got = np.shape(arr) if not isinstance(arr, tuple) else arr
        if want != tuple(got):
            raise AssertionError(f"{name}: the table says [{sym}] = {want}, the array is {got}")
        concrete = "×".join(str(n) for n in want) if want else "scalar"
        self.sections[-1][2].append((name, f"[{sym}]" if sym.strip() else "scalar", concrete, note))

    def markdown(self):
        out = []
        for title, header, rows in self.sections:
            out.append(f"### {title}\n")
            out.append(f"| {header[0]} | shape | here | {header[1]} |")
            out.append("|---|---|---:|---|")
            for name, sym, concrete, note in rows:
                out.append(f"| {name} | {sym} | {concrete} | {note} |")
            out.append("")
        return "\n".join(out)


def walk(cfg, B, T, seed=0):
    """Forward and backward of cfg on random ids, every shape checked; returns the Table."""
    from .model import GPT
    if (cfg.model != "gpt" or not cfg.residual or cfg.ffn_mult == 0 or not cfg.attn_proj
            or not cfg.ffn_proj or cfg.norm != "pre"):
        raise ConfigError("the shape walk follows a pre-norm gpt with residual connections, the "
                          "attention projection and a two-layer feed-forward (preln, scaled, "
                          "laptop, hour)")
    cfg = cfg.replace(kernels=False, dropout=0.0, zero_head=False)
    model = GPT(cfg, seed=seed, dtype=np.float64)
    C, H, V = cfg.n_embd, cfg.n_head, cfg.vocab_size
    dims = dict(B=B, T=T, C=C, H=H, hs=cfg.head_size, F=cfg.ffn_hidden, V=V, Tmax=cfg.block_size,
                N=B * T)
    tb = Table(dims)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, V, (B, T))
    tgt = rng.integers(0, V, (B, T))
    logits, cache = model.forward(idx)
    P = model.params
    bc = cache["blocks"][0]

    tb.section("Parameters and their gradients (a gradient has its parameter's shape)",
               ("parameter", "what it is"))
    grads_all = model.backward(model.ops.cross_entropy(logits, tgt)[1], cache)
    what = {"tok_emb": "token table", "pos_emb": "position table (rows past T get zero gradient)",
            "ln1.g": "LayerNorm gain", "ln1.b": "LayerNorm bias", "attn.w_q": "H query maps of "
            "C × hs side by side", "attn.w_k": "keys, the same", "attn.w_v": "values, the same",
            "attn.w_proj": "output projection", "attn.b_proj": "", "ln2.g": "", "ln2.b": "",
            "ffn.w_fc": "feed-forward up", "ffn.b_fc": "", "ffn.w_out": "feed-forward down",
            "ffn.b_out": "", "ln_f.g": "final LayerNorm", "ln_f.b": "", "lm_head.w": "logits",
            "lm_head.b": ""}
    sym_of = {"tok_emb": "V, C", "pos_emb": "Tmax, C", "w_q": "C, C", "w_k": "C, C",
              "w_v": "C, C", "w_proj": "C, C", "b_proj": "C", "w_fc": "C, F", "b_fc": "F",
              "w_out": "F, C", "b_out": "C", "g": "C", "b": "C", "lm_head.w": "C, V",
              "lm_head.b": "V"}
    for name, p in P.items():
        if name.startswith("blocks.") and not name.startswith("blocks.0."):
            continue
        short = name.replace("blocks.0.", "")
        sym = sym_of.get(name, sym_of.get(short.rsplit(".", 1)[-1]))
        assert grads_all[name].shape == p.shape
        tb.add(f"`{name}`" + (" (every block)" if name.startswith("blocks.0.") else ""), sym, p,
               what.get(short, ""))

    tb.section("Forward: activations and what each layer keeps for its backward",
               ("tensor", "computed by / kept in"))
    tb.add("idx, targets", "B, T", idx, "token ids (int)")
    c_tok, c_pos = cache["emb"]
    tb.add("tok_emb[idx]", "B, T, C", P["tok_emb"][idx], "`embedding_forward`; cache: idx and the "
           "table's shape")
    tb.add("pos_emb[:T]", "T, C", P["pos_emb"][:T], "`position_forward`; broadcast over B")
    x = P["tok_emb"][idx] + P["pos_emb"][:T]
    tb.add("x (block input)", "B, T, C", x, "the residual stream")
    xhat, rstd, g = bc["ln1"]
    tb.add("LN1 cache: xhat", "B, T, C", xhat, "`layernorm_forward`: normalised input")
    tb.add("LN1 cache: rstd", "B, T, 1", rstd, "1/sqrt(var + eps), one per position")
    cq, ck, cv, ca, cp, cd, _ = bc["attn"]
    tb.add("h = LN1(x)", "B, T, C", cq[0], "attention input (kept by the q, k, v Linear caches)")
    q, k, v, p, pd, dmask, scale = ca
    tb.add("q = h W_q (also k, v)", "B, T, C", _merge(q), "`linear_forward`")
    tb.add("q, k, v split into heads", "B, H, T, hs", q, "`split_heads`; kept in the attention "
           "cache")
    tb.add("S = q k^T / sqrt(hs), masked", "B, H, T, T", q @ k.swapaxes(-1, -2),
           "not kept: the backward needs only P")
    tb.add("scale = 1/sqrt(hs)", "", np.float64(scale), "kept")
    tb.add("P = softmax(S)", "B, H, T, T", p, "kept: the softmax backward needs it")
    tb.add("P after dropout", "B, H, T, T", pd, "kept (the same array as P when dropout is 0)")
    tb.add("O = P v", "B, H, T, hs", p @ v, "")
    u = cp[0]
    tb.add("u = merge_heads(O)", "B, T, C", u, "`merge_heads`; kept by the projection's cache")
    z = u @ P["blocks.0.attn.w_proj"] + P["blocks.0.attn.b_proj"]
    tb.add("a = u W_proj + b_proj", "B, T, C", z, "attention output (dropout mask: B, T, C when on)")
    x1 = x + z
    tb.add("x + a", "B, T, C", x1, "`residual_forward`")
    c1, ca_act, c2, cdf, act = bc["ffn"]
    tb.add("LN2(x + a)", "B, T, C", c1[0], "feed-forward input (in the fc Linear cache)")
    hpre = c1[0] @ c1[1] + P["blocks.0.ffn.b_fc"]
    tb.add("h = LN2(.) W_fc + b_fc", "B, T, F", hpre, "")
    act_cache = ca_act if act == "relu" else ca_act[0]
    tb.add(f"{act} cache", "B, T, F", act_cache, "ReLU: the 0/1 mask; GELU: x and tanh(u)")
    tb.add(f"{act}(h)", "B, T, F", c2[0], "kept by the down Linear's cache")
    tb.add(f"f = {act}(h) W_out + b_out", "B, T, C", c2[0] @ c2[1] + P["blocks.0.ffn.b_out"], "")
    tb.add("block output x + a + f", "B, T, C", x1 + c2[0] @ c2[1] + P["blocks.0.ffn.b_out"],
           "input of block 1, ...")
    xf, rf, _ = cache["ln_f"] if cache["ln_f"] is not None else (None, None, None)
    if xf is not None:
        tb.add("LN_f cache: xhat, rstd", "B, T, C", xf, "`layernorm_forward` (rstd: [B, T, 1])")
        assert rf.shape == (B, T, 1)
    tb.add("logits", "B, T, V", logits, "`linear_forward` of lm_head")
    loss, (logp, t, _) = cross_entropy_forward(logits, tgt)
    tb.add("cross-entropy cache: log-softmax", "N, V", logp, "N = B·T positions")
    tb.add("cross-entropy cache: targets", "N", t, "")
    tb.add("loss", "", np.float64(loss), "mean over the N positions")

    tb.section("Backward: the gradient at each step (block 0; every block the same)",
               ("gradient", "computed by"))
    dlogits = model.ops.cross_entropy(logits, tgt)[1]
    tb.add("dlogits", "B, T, V", dlogits, "(softmax - onehot) / N")
    dx, dWh, dbh = linear_backward(dlogits, cache["head"])
    tb.add("dx into lm_head", "B, T, C", dx, "dlogits W_head^T")
    if cache["ln_f"] is not None:
        dx, _, _ = model.ops.layernorm_backward(dx, cache["ln_f"])
        tb.add("dx through LN_f", "B, T, C", dx, "`layernorm_backward`")
    grads = {}
    for i in reversed(range(1, cfg.n_layer)):
        dx = model._block_backward(dx, i, cache["blocks"][i], grads)
    tb.add("dy: into block 0's output", "B, T, C", dx, "after the later blocks")
    # feed-forward sublayer: y = x1 + f(LN2(x1)) (pre-norm) — both branches get dy
    dfx = dx
    da = dfx
    da_h, dWo, dbo = linear_backward(da, c2)
    tb.add(f"d {act}(h) = dy W_out^T", "B, T, F", da_h, "")
    dh = ACTIVATIONS[act][1](da_h, ca_act)
    tb.add(f"dh = d {act}(h) * {act}'(h)", "B, T, F", dh, f"`{act}_backward`")
    dln2, dWfc, dbfc = linear_backward(dh, c1)
    tb.add("d LN2 output = dh W_fc^T", "B, T, C", dln2, "")
    dln2, _, _ = model.ops.layernorm_backward(dln2, bc["ln2"])
    tb.add("through LN2", "B, T, C", dln2, "")
    dx1 = dx + dln2
    tb.add("d(x + a) = dy + that", "B, T, C", dx1, "the skip adds dy (`residual_backward`)")
    du, dWp, dbp = linear_backward(dx1, cp)
    tb.add("du = d(x + a) W_proj^T", "B, T, C", du, "")
    dO = _split(du, H)
    tb.add("dO = split_heads(du)", "B, H, T, hs", dO, "")
    dpd = dO @ v.swapaxes(-1, -2)
    tb.add("dP = dO v^T", "B, H, T, T", dpd, "full, also above the diagonal")
    dv = pd.swapaxes(-1, -2) @ dO
    tb.add("dv = P^T dO", "B, H, T, hs", dv, "")
    ds = p * (dpd - (dpd * p).sum(axis=-1, keepdims=True))
    tb.add("rowsum(dP * P)", "B, H, T, 1", (dpd * p).sum(axis=-1, keepdims=True), "one per query")
    tb.add("dS = P * (dP - rowsum)", "B, H, T, T", ds, "0 above the diagonal")
    dq, dk = scale * ds @ k, scale * ds.swapaxes(-1, -2) @ q
    tb.add("dq = scale dS k,  dk = scale dS^T q", "B, H, T, hs", dq, "")
    tb.add("merge_heads(dq) (also dk, dv)", "B, T, C", _merge(dq), "")
    dxq = _merge(dq) @ P["blocks.0.attn.w_q"].T
    tb.add("dq W_q^T + dk W_k^T + dv W_v^T", "B, T, C", dxq, "h fed three Linears: the sum")
    dh_attn, dxc = model.ops.multihead_backward(dx1, bc["attn"])
    assert np.allclose(dh_attn, dxq + _merge(dk) @ P["blocks.0.attn.w_k"].T
                       + _merge(dv) @ P["blocks.0.attn.w_v"].T)
    dh_attn, _, _ = model.ops.layernorm_backward(dh_attn, bc["ln1"])
    tb.add("through LN1", "B, T, C", dh_attn, "")
    dx0 = dx1 + dh_attn
    tb.add("dx: into block 0 = the embeddings' gradient", "B, T, C", dx0, "the skip adds d(x + a)")
    dtok, dpos = model.ops.embed_backward(dx0, cache["emb"])
    tb.add("d tok_emb", "V, C", dtok, "scatter-add of dx by token id (`embedding_backward`)")
    tb.add("d pos_emb", "Tmax, C", dpos, "sum of dx over B (`position_backward`)")
    # the step-by-step walk agrees with GPT.backward
    assert np.allclose(dtok, grads_all["tok_emb"]) and np.allclose(dpos, grads_all["pos_emb"])
    assert np.allclose(dWfc, grads_all["blocks.0.ffn.w_fc"])
    return tb


def main(argv):
    from .cli import parse_flags
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return 0
    opts = parse_flags(argv, set(FIELDS) | {"preset", "T"})
    preset = opts.pop("preset", "preln")
    T = opts.pop("T", None)
    cfg = get_config(preset, **opts)
    try:
        T = cfg.block_size if T is None else int(T)
    except ValueError:
        raise ConfigError(f"--T must be a whole number, got {T!r}") from None
    if not 1 <= T <= cfg.block_size:
        raise ConfigError(f"--T must be from 1 to block_size ({cfg.block_size}), got {T}")
    if cfg.batch_size * T * max(cfg.n_embd * 4, cfg.ffn_hidden, cfg.n_head * T) > 5e7:
        raise ConfigError("that model is too big to walk through here; use a smaller "
                          "--batch_size or --T")
    tb = walk(cfg, cfg.batch_size, T)
    d = tb.dims
    print(f"Shapes through `{preset}` (python -m numgpt.shapes{' ' + ' '.join(argv) if argv else ''}"
          f"): B = {d['B']}, T = {d['T']}, Tmax = block_size = {d['Tmax']}, C = {d['C']}, "
          f"H = {d['H']}, hs = {d['hs']}, F = {d['F']}, V = {d['V']}, N = B·T = {d['N']}; "
          f"norm = {cfg.norm}, activation = {cfg.activation}.\n")
    print(tb.markdown())
    return 0


if __name__ == "__main__":
    from .cli import run
    sys.exit(run(main))
