"""The structure of a GPT's blocks, described once from its Config.

    a = arch(cfg)      Arch(n_layer=4, n_head=4, norm=NORM_PRE, residual=True, attn_proj=True,
                            ffn=True, ffn_proj=True, activation=ACT_RELU)

Every block of the model is: an attention sublayer, then (with `ffn`) a feed-forward sublayer;
each sublayer reads the stream x through its LayerNorm (NORM_PRE) or directly, adds its output
to x (`residual`) or replaces x with it, and, with NORM_POST, normalises the result. The
reference model (numgpt/model.py), the fused training step (numgpt/parallel.FusedStep and
kernels/step.py) and the compiled decoder (numgpt/generate.KVCache and kernels/decode.py) all
read this one description. Arch holds plain ints and bools, so numba takes it as an argument
(and caches what it compiles for it); the constants are compiled into the kernels.

The block itself is written once too, at the end of this file: block_forward and block_backward
put the pieces together in the order above. Each of the three runs these same two functions with
its own pieces (BlockForward, BlockBackward): the model with the NumPy layers, as Python; the
step and the decoder with their kernels, compiled by numba (kernels/_jit.py: block_forward,
block_backward, pieces).
"""
from typing import NamedTuple

# where a block's LayerNorms sit
NORM_NONE = 0  # no LayerNorm (nor a final one before the head)
NORM_POST = 1  # after each sublayer's residual sum: x = LN(x + f(x))
NORM_PRE = 2   # on each sublayer's input: x = x + f(LN(x))
NORMS = {"none": NORM_NONE, "post": NORM_POST, "pre": NORM_PRE}

# the feed-forward sublayer's activation
ACT_RELU = 0
ACT_GELU = 1
ACTIVATIONS = {"relu": ACT_RELU, "gelu": ACT_GELU}

# a block's sublayers, in order, each with its parameters' prefix and its LayerNorm's
SUB_ATTN = 0
SUB_FFN = 1
SUBLAYERS = (("attn", "ln1"), ("ffn", "ln2"))  # SUBLAYERS[SUB_ATTN], SUBLAYERS[SUB_FFN]

# a block's parameters by their short names (block i's are "blocks.{i}." + name), in the order the
# model lists them; the fused step addresses them by their place in this tuple (kernels/step.py)
BLOCK_PARAMS = ("ln1.g", "ln1.b", "attn.w_q", "attn.w_k", "attn.w_v", "attn.w_proj", "attn.b_proj",
                "ln2.g", "ln2.b", "ffn.w_fc", "ffn.b_fc", "ffn.w_out", "ffn.b_out")
# the parameters outside the blocks, in order; the blocks come between pos_emb and ln_f
TOP_PARAMS = ("tok_emb", "pos_emb", "ln_f.g", "ln_f.b", "lm_head.w", "lm_head.b")


class Arch(NamedTuple):
    """What a GPT block is made of (see the module notes)."""
    n_layer: int
    n_head: int
    norm: int         # NORM_NONE, NORM_POST or NORM_PRE
    residual: bool    # x + f(x), else f(x)
    attn_proj: bool   # attention ends in a linear projection (w_proj, b_proj)
    ffn: bool         # a feed-forward sublayer follows attention
    ffn_proj: bool    # the feed-forward sublayer ends in its output linear (w_out, b_out)
    activation: int   # ACT_RELU or ACT_GELU

    def __repr__(self):
        """With the constants' names, not their values: Arch(..., norm=NORM_PRE, ...)."""
        named = {"norm": {v: "NORM_" + k.upper() for k, v in NORMS.items()},
                 "activation": {v: "ACT_" + k.upper() for k, v in ACTIVATIONS.items()}}
        shown = (named[k].get(v, repr(v)) if k in named else repr(v)
                 for k, v in self._asdict().items())
        return "Arch(" + ", ".join(f"{k}={v}" for k, v in zip(self._fields, shown)) + ")"


def n_sublayers(a):
    """How many sublayers a block of Arch a has: the first n_sublayers(a) of SUBLAYERS, i.e.
    attention, then the feed-forward where a.ffn (block_forward and block_backward loop over
    range(n_sublayers(a)))."""
    return 2 if a.ffn else 1


def has_param(a, name):
    """Whether a GPT of Arch a has the parameter name (one of BLOCK_PARAMS or TOP_PARAMS)."""
    part, _, leaf = name.partition(".")
    if part in ("ln1", "ln2", "ln_f") and a.norm == NORM_NONE:
        return False
    if part in ("ln2", "ffn") and not a.ffn:
        return False
    if leaf in ("w_proj", "b_proj"):
        return a.attn_proj
    if leaf in ("w_out", "b_out"):
        return a.ffn_proj
    return True


def arch(cfg):
    """The Arch of a GPT config (cfg.model == "gpt")."""
    return Arch(n_layer=int(cfg.n_layer), n_head=int(cfg.n_head), norm=NORMS[cfg.norm],
                residual=bool(cfg.residual), attn_proj=bool(cfg.attn_proj),
                ffn=bool(cfg.ffn_mult > 0), ffn_proj=bool(cfg.ffn_proj),
                activation=ACTIVATIONS[cfg.activation])


# ---- a block, written once ----

class BlockForward(NamedTuple):
    """The pieces of a block's forward, for block_forward. Each takes st first: the caller's state
    for this block (its parameters, what it keeps for the backward, its buffers), and j, the
    sublayer (SUB_ATTN, SUB_FFN)."""
    norm_in: object    # (st, j, x) -> LN_j(x), pre-norm's LayerNorm of the sublayer's input
    sublayer: object   # (st, j, h) -> f(h): multi-head attention or the feed-forward
    add: object        # (st, x, f) -> x + f, the residual sum
    norm_out: object   # (st, j, x) -> LN_j(x), post-norm's LayerNorm after the residual sum


class BlockBackward(NamedTuple):
    """The backward of each piece of BlockForward, for block_backward: each takes the gradient of
    its piece's output and returns that of its input (and keeps its parameters' gradients)."""
    norm_out: object   # (st, j, dy) -> dx, through post-norm's LayerNorm
    sublayer: object   # (st, j, df) -> dh, through the attention or the feed-forward
    norm_in: object    # (st, j, dh) -> dx, through pre-norm's LayerNorm
    add: object        # (st, dy, dh) -> dx = dy + dh: the skip passes the sum's gradient dy
    #                    to x, and dh came back through the sublayer (x fed both)


def block_forward(a, ops, st, x):
    """One block of Arch a on the residual stream x [.., C] -> the stream after it. For each
    sublayer j (attention, then the feed-forward where a.ffn), with ops a BlockForward:
        h = LN_j(x)     (pre-norm)    else  h = x
        f = sublayer_j(h)
        x = x + f       (residual)    else  x = f
        x = LN_j(x)     (post-norm)
    """
    for j in range(n_sublayers(a)):
        h = ops.norm_in(st, j, x) if a.norm == NORM_PRE else x
        f = ops.sublayer(st, j, h)
        x = ops.add(st, x, f) if a.residual else f
        if a.norm == NORM_POST:
            x = ops.norm_out(st, j, x)
    return x


def block_backward(a, ops, st, dx):
    """The backward of block_forward: dx, the gradient of the block's output -> that of its input.
    For each sublayer, the last first, with ops a BlockBackward:
        dx = LN_j'(dx)          (post-norm)
        dh = sublayer_j'(dx)    dx is now the gradient of f, and (residual) of the skip's x
        dh = LN_j'(dh)          (pre-norm)
        dx = dx + dh            (residual: x went both ways, its gradient is the sum)  else dx = dh
    (docs/derivations.md#residual)
    """
    for j in range(n_sublayers(a) - 1, -1, -1):
        if a.norm == NORM_POST:
            dx = ops.norm_out(st, j, dx)
        dh = ops.sublayer(st, j, dx)
        if a.norm == NORM_PRE:
            dh = ops.norm_in(st, j, dh)
        dx = ops.add(st, dx, dh) if a.residual else dh
    return dx
