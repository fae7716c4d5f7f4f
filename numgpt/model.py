"""The GPT assembled from the layers; every rung of the ladder is a Config of this one model.

    idx [B, T] -> tok_emb[idx] + pos_emb[:T]                 x [B, T, C]
               -> n_layer blocks, each:
                    attention sublayer   a = MHA(x)           (pre-norm: MHA(LN1(x)))
                                         x = x + a            (residual, else x = a)
                                         x = LN1(x)           (post-norm only)
                    feed-forward sublayer, the same with FFN and LN2
               -> LN_f (when norm is not "none") -> lm_head  logits [B, T, V]
    The bigram model is logits = tok_emb[idx] with a [V, V] table.

A block is numgpt.arch.block_forward / block_backward, the one place its structure is written,
run here with the layers as its pieces (_norm_in, _sublayer, _add, _norm_out and their backward
passes, named as kernels/step.py's and kernels/decode.py's); the compiled step and decoder run the
same two functions with their kernels.

Parameters live in a flat dict name -> array; weights are stored [in, out] (y = x W + b).
"""
import numpy as np

from ._threads import training_starts
from .arch import (BLOCK_PARAMS, NORM_NONE, SUB_ATTN, SUBLAYERS, TOP_PARAMS, BlockBackward,
                   BlockForward, arch, block_backward, block_forward, has_param)
from .config import Config, validate
from .layers import linear_backward, linear_forward, residual_backward, residual_forward
from .ops import get_ops


def param_shapes(cfg):
    """Ordered dict name -> shape of every parameter tensor of the model described by cfg.

    Which parameters a GPT has, and their order, come from its Arch (numgpt/arch.py): the
    embeddings, then each block's BLOCK_PARAMS that it has, then the final LayerNorm and lm_head.
    """
    V, C = cfg.vocab_size, cfg.n_embd
    if cfg.model == "bigram":
        return {"tok_emb": (V, V)}
    a, F = arch(cfg), cfg.ffn_hidden  # F: the feed-forward width (docs/derivations.md's F)
    shape = {"tok_emb": (V, C), "pos_emb": (cfg.block_size, C),
             "ln1.g": (C,), "ln1.b": (C,),
             "attn.w_q": (C, C), "attn.w_k": (C, C), "attn.w_v": (C, C),
             "attn.w_proj": (C, C), "attn.b_proj": (C,),
             "ln2.g": (C,), "ln2.b": (C,),
             "ffn.w_fc": (C, F), "ffn.b_fc": (F,), "ffn.w_out": (F, C), "ffn.b_out": (C,),
             "ln_f.g": (C,), "ln_f.b": (C,), "lm_head.w": (C, V), "lm_head.b": (V,)}
    embed, head = TOP_PARAMS[:2], TOP_PARAMS[2:]
    shapes = {n: shape[n] for n in embed}
    for i in range(a.n_layer):
        shapes.update((f"blocks.{i}.{n}", shape[n]) for n in BLOCK_PARAMS if has_param(a, n))
    shapes.update((n, shape[n]) for n in head if has_param(a, n))
    return shapes


def init_params(cfg, seed=0, dtype=np.float32):
    """Fresh parameters, drawn in float64 and then cast: one seed gives the same model in any dtype.

    init="torch": PyTorch's defaults (embeddings N(0, 1); a Linear's weight and bias U(-k, k),
    k = 1/sqrt(fan_in)); init="normal": weights and embeddings N(0, init_std), biases 0.
    LayerNorm starts at g = 1, b = 0 either way. zero_head: the output layer (lm_head, or the
    bigram table, which is the logits) starts at zero, so an untrained model predicts the uniform
    distribution and its loss is exactly ln(vocab_size).
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        leaf = name.rsplit(".", 1)[-1]
        if cfg.zero_head and (name.startswith("lm_head") or cfg.model == "bigram"):
            p = np.zeros(shape)
        elif name.endswith(".g"):
            p = np.ones(shape)
        elif ".ln" in name or name.startswith("ln_f"):
            p = np.zeros(shape)
        elif name in ("tok_emb", "pos_emb"):
            p = rng.normal(0.0, 1.0 if cfg.init == "torch" else cfg.init_std, shape)
        elif cfg.init == "normal":
            p = rng.normal(0.0, cfg.init_std, shape) if leaf.startswith("w") else np.zeros(shape)
        else:  # torch: weight [in, out] and its bias both U(-1/sqrt(in), 1/sqrt(in))
            wname = name if leaf.startswith("w") else name.replace(".b", ".w", 1)
            fan_in = param_shapes(cfg)[wname][0]
            k = 1.0 / np.sqrt(fan_in)
            p = rng.uniform(-k, k, shape)
        params[name] = p.astype(dtype)
    return params


def _sub(params, prefix):
    """The entries of params under prefix, with the prefix removed: {'w_q': ..., ...}."""
    n = len(prefix)
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix)}


def _block_names(cfg, i):
    """{'attn.w_q': 'blocks.{i}.attn.w_q', ...}: block i's parameters under their short names."""
    pre = f"blocks.{i}."
    return {k[len(pre):]: k for k in param_shapes(cfg) if k.startswith(pre)}


def _check_ids(ids, vocab_size, what):
    """ids as an integer [B, T] array with every id in [0, vocab_size); ValueError otherwise.

    The kernels index tables with these ids unchecked, so an id out of range would read or
    write outside an array; this is the one place they are checked.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty [B, T] array of token ids, got shape "
                         f"{ids.shape}")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{what} holds token id {lo if lo < 0 else hi}, outside the vocabulary "
                         f"[0, {vocab_size})")
    return ids


def _check_targets(y, logits):
    y = _check_ids(y, logits.shape[-1], "targets")
    if y.shape != logits.shape[:-1]:
        raise ValueError(f"targets have shape {y.shape}, the inputs {logits.shape[:-1]}")
    return y


# ---- a block's pieces on the layers: numgpt.arch.block_forward and block_backward put them
# together (the compiled step and decoder give the same two functions their kernels instead) ----

class _Layer:
    """One pass through one block (layer i): the layers (numgpt.ops), the block's parameters by
    short name, dropout and its rng, generation's key/value cache and the block's index i; the
    cache the forward fills ({'ln1': ..., 'attn': ..., ...}) and the backward reads, and the
    gradients' dict with the block's prefix."""

    def __init__(self, ops, p, cfg, train=False, rng=None, kv=None, i=0, cache=None, grads=None,
                 prefix=""):
        self.ops, self.p, self.cfg, self.rng, self.kv, self.i = ops, p, cfg, rng, kv, i
        self.drop = cfg.dropout if train else 0.0
        self.cache, self.grads, self.prefix = cache, grads, prefix


def _norm_in(st, j, x):
    """LN_j(x) on sublayer j's input (pre-norm), LN_j the LayerNorm of sublayer j (ln1 for
    attention, ln2 for the feed-forward)."""
    ln = SUBLAYERS[j][1]
    y, st.cache[ln] = st.ops.layernorm_forward(x, st.p[ln + ".g"], st.p[ln + ".b"])
    return y


def _norm_out(st, j, x):
    """LN_j(x) after sublayer j's residual sum (post-norm): the same LayerNorm as _norm_in's."""
    return _norm_in(st, j, x)


def _sublayer(st, j, h):
    """f(h): multi-head attention (j = SUB_ATTN) or the feed-forward, with dropout. Generating
    with a key/value cache, attention reads the new positions against the cached past."""
    name = SUBLAYERS[j][0]
    sp = _sub(st.p, name + ".")
    if j == SUB_ATTN and st.kv is not None:
        return st.kv.attend(h, sp, st.i)
    if j == SUB_ATTN:
        f, st.cache[name] = st.ops.multihead_forward(h, sp, st.cfg.n_head, st.drop, st.drop,
                                                     st.rng)
    else:
        f, st.cache[name] = st.ops.feedforward_forward(h, sp, st.cfg.activation, st.drop, st.rng)
    return f


def _add(st, x, f):
    """x + f: the residual sum (numgpt/layers/residual.py)."""
    return residual_forward(x, f)


def _norm_out_backward(st, j, dy):
    """The backward of _norm_out: dy -> dx; LN_j's g and b gradients into the grads."""
    ln = SUBLAYERS[j][1]
    g = st.prefix + ln
    dx, st.grads[g + ".g"], st.grads[g + ".b"] = st.ops.layernorm_backward(dy, st.cache[ln])
    return dx


def _sublayer_backward(st, j, df):
    """The backward of _sublayer: df -> dh; the sublayer's parameters' gradients into the grads."""
    name = SUBLAYERS[j][0]
    if j == SUB_ATTN:
        dh, g = st.ops.multihead_backward(df, st.cache[name])
    else:
        dh, g = st.ops.feedforward_backward(df, st.cache[name])
    for k, v in g.items():
        st.grads[st.prefix + name + "." + k] = v
    return dh


def _norm_in_backward(st, j, dh):
    """The backward of _norm_in: dh -> dx; LN_j's g and b gradients into the grads."""
    return _norm_out_backward(st, j, dh)


def _add_backward(st, dy, dh):
    """The backward of _add, y = x + f(x): the skip passes y's gradient dy on to x
    (residual_backward; f's share went through the sublayer and came back as dh), and x's
    gradient is the sum of the two."""
    dskip, _ = residual_backward(dy)
    return dskip + dh


_FORWARD = BlockForward(norm_in=_norm_in, sublayer=_sublayer, add=_add, norm_out=_norm_out)
_BACKWARD = BlockBackward(norm_out=_norm_out_backward, sublayer=_sublayer_backward,
                          norm_in=_norm_in_backward, add=_add_backward)


class GPT:
    """A character-level GPT with hand-written backward passes.

    model = GPT(cfg, seed=0, dtype=np.float64)
    loss, grads = model.loss_and_grads(x, y, rng=np.random.default_rng(0))
    """

    def __init__(self, cfg: Config, seed=0, dtype=np.float32, params=None):
        self.cfg = validate(cfg)
        self.arch = arch(self.cfg)  # the blocks' structure, read here and by the compiled paths
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        self.ops = get_ops(self.cfg.kernels)  # numba kernels, or the NumPy reference layers
        self._names = [_block_names(self.cfg, i) for i in range(self.cfg.n_layer)]
        self.params = init_params(self.cfg, seed, self.dtype) if params is None else {}
        if params is not None:
            self.set_params(params)

    # ---- parameters as a name -> array dict ----
    def get_params(self):
        """A copy of every parameter, name -> array."""
        return {k: v.copy() for k, v in self.params.items()}

    def set_params(self, params):
        """Replace the parameters; names and shapes must match this config exactly, and every value
        must be a real number (float or integer dtype) that is finite in the model's dtype."""
        shapes = param_shapes(self.cfg)
        missing = set(shapes) - set(params)
        extra = set(params) - set(shapes)
        if missing or extra:
            raise ValueError("parameter names do not match the config: "
                             f"missing {sorted(missing)}, unexpected {sorted(extra)}")
        new = {}
        for name, shape in shapes.items():
            a = np.asarray(params[name])
            if a.shape != tuple(shape):
                raise ValueError(f"parameter {name} has shape {a.shape}, the config needs {shape}")
            if a.dtype.kind not in "fiu":  # complex would lose its imaginary part; bools, text no
                raise ValueError(f"parameter {name} must hold real numbers (a float or integer "
                                 f"dtype), got dtype {a.dtype}")
            with np.errstate(over="ignore"):  # float64 beyond float32's range: checked next
                new[name] = a.astype(self.dtype, copy=True)
            if not np.isfinite(new[name]).all():
                raise ValueError(f"parameter {name} holds NaN or infinite values (in {self.dtype})")
        self.params = new

    def num_params(self):
        return sum(v.size for v in self.params.values())

    # ---- forward / backward ----
    def _block_forward(self, x, i, train, rng, kv=None):
        """Block i on the stream x -> (its output, its cache): numgpt.arch.block_forward with the
        layers (_FORWARD, above the class). train: dropout on; kv: generation's cache."""
        p = {short: self.params[full] for short, full in self._names[i].items()}
        st = _Layer(self.ops, p, self.cfg, train, rng, kv, i, cache={})
        return block_forward(self.arch, _FORWARD, st, x), st.cache

    def _block_backward(self, dx, i, cache, grads):
        """The backward of _block_forward: dx -> the gradient of block i's input; its parameters'
        gradients into grads under their full names (numgpt.arch.block_backward, _BACKWARD)."""
        st = _Layer(self.ops, None, self.cfg, cache=cache, grads=grads, prefix=f"blocks.{i}.")
        return block_backward(self.arch, _BACKWARD, st, dx)

    def _head_forward(self, x):
        """The head: logits = LN_f(x) W + b (LN_f unless norm is none) -> logits, the LayerNorm's
        cache (None without it), the linear's cache."""
        c_lnf = None
        if self.arch.norm != NORM_NONE:
            x, c_lnf = self.ops.layernorm_forward(x, self.params["ln_f.g"], self.params["ln_f.b"])
        logits, c_head = linear_forward(x, self.params["lm_head.w"], self.params["lm_head.b"])
        return logits, c_lnf, c_head

    def _head_backward(self, dlogits, c_lnf, c_head, grads):
        """The backward of _head_forward: dlogits -> dx, the gradient of the last block's output;
        the lm_head's (and LN_f's) gradients into grads."""
        dx, grads["lm_head.w"], grads["lm_head.b"] = linear_backward(dlogits, c_head)
        if c_lnf is not None:
            dx, grads["ln_f.g"], grads["ln_f.b"] = self.ops.layernorm_backward(dx, c_lnf)
        return dx

    def forward(self, idx, train=False, rng=None, kv=None, keep_cache=True):
        """idx: [B, T] token ids (T <= block_size) -> logits [B, T, V], cache for backward.

        train=True turns dropout on; its masks are drawn from rng (a numpy Generator), so passing
        generators with the same seed replays the same masks.
        kv: a generate.KVCache; idx then holds the next T positions after the kv.t cached ones
        (inference only: no cache for backward is returned).
        keep_cache=False: no cache for backward either; each block's activations are freed as
        soon as the block is done (a loss needs no more; the whole cache of the scaled rung at
        batch 64 holds gigabytes of activations, which a forward pass would otherwise keep).
        """
        cfg, P, ops = self.cfg, self.params, self.ops
        idx = _check_ids(idx, cfg.vocab_size, "idx")
        T = idx.shape[1]
        t0 = 0 if kv is None else kv.t
        if t0 + T > cfg.block_size and cfg.model == "gpt":
            raise ValueError(f"sequence length {t0 + T} exceeds block_size {cfg.block_size}")
        if train and cfg.dropout > 0 and rng is None:
            raise ValueError("training with dropout needs rng (a numpy Generator)")
        if cfg.model == "bigram":
            logits, c_tok = ops.table_forward(idx, P["tok_emb"])
            return logits, {"tok": c_tok}
        # tok_emb[idx] + pos_emb[t0:t0 + T]
        x, c_emb = ops.embed_forward(idx, P["tok_emb"], P["pos_emb"][t0:])
        keep_cache = keep_cache and kv is None
        blocks = []
        for i in range(cfg.n_layer):
            if keep_cache:
                x, bc = self._block_forward(x, i, train, rng)
                blocks.append(bc)
            else:
                x = self._block_forward(x, i, train and kv is None, rng, kv)[0]
        logits, c_lnf, c_head = self._head_forward(x)
        if kv is not None:
            kv.t += T
        if not keep_cache:
            return logits, None
        return logits, {"emb": c_emb, "blocks": blocks, "ln_f": c_lnf, "head": c_head}

    def backward(self, dlogits, cache):
        """dlogits [B, T, V] -> grads: one entry per parameter (same names, shapes, dtype)."""
        cfg, ops = self.cfg, self.ops
        if cfg.model == "bigram":
            return {"tok_emb": ops.table_backward(dlogits, cache["tok"])}
        grads = {}
        dx = self._head_backward(dlogits, cache["ln_f"], cache["head"], grads)
        for i in reversed(range(cfg.n_layer)):
            dx = self._block_backward(dx, i, cache["blocks"][i], grads)
        # x = tok_emb[idx] + pos_emb[:T]: both tables receive dx
        grads["tok_emb"], grads["pos_emb"] = ops.embed_backward(dx, cache["emb"])
        return {k: grads[k] for k in self.params}

    def loss(self, x, y, train=False, rng=None):
        """Mean cross-entropy of next-token prediction for inputs x [B, T] and targets y [B, T]."""
        logits, _ = self.forward(x, train, rng, keep_cache=False)
        return self.ops.cross_entropy(logits, _check_targets(y, logits), want_grad=False)[0]

    def loss_and_grads(self, x, y, train=True, rng=None, grad_scale=1.0):
        """(loss, grads): the mean cross-entropy and its gradient for every parameter.

        train=True (the default) applies dropout with masks drawn from rng. grad_scale: the
        gradients are those of grad_scale * loss (the data-parallel steps weight each shard so).
        """
        if self.cfg.kernels:
            training_starts()  # malloc keeps the steps' freed memory from now on (_threads.py)
        logits, cache = self.forward(x, train, rng)
        loss, dlogits = self.ops.cross_entropy(logits, _check_targets(y, logits), want_grad=True)
        if grad_scale != 1.0:
            dlogits *= dlogits.dtype.type(grad_scale)
        return loss, self.backward(dlogits, cache)

    # ---- generation without a key/value cache (the video's way; generate.py has the cache) ----
    def next_token_logits(self, idx):
        """idx: [B, T] -> logits of the next token [B, V] (float64), from the last block_size."""
        idx = np.asarray(idx)[:, -self.cfg.block_size:]
        logits, _ = self.forward(idx, train=False, keep_cache=False)
        return logits[:, -1, :].astype(np.float64)
