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


def n_sublayers(a):
    """How many sublayers a block of Arch a has: the first n_sublayers(a) of SUBLAYERS, i.e.
    attention, then the feed-forward where a.ffn. The compiled step and decoder loop over
    range(n_sublayers(a)) (kernels/step.py, kernels/decode.py)."""
    return 2 if a.ffn else 1


def sublayers(a):
    """The sublayers a block of Arch a has, in order: SUB_ATTN, then SUB_FFN where a.ffn."""
    return tuple(range(n_sublayers(a)))


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
