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

# a block's sublayers, in order
SUB_ATTN = 0
SUB_FFN = 1


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


def arch(cfg):
    """The Arch of a GPT config (cfg.model == "gpt")."""
    return Arch(n_layer=int(cfg.n_layer), n_head=int(cfg.n_head), norm=NORMS[cfg.norm],
                residual=bool(cfg.residual), attn_proj=bool(cfg.attn_proj),
                ffn=bool(cfg.ffn_mult > 0), ffn_proj=bool(cfg.ffn_proj),
                activation=ACTIVATIONS[cfg.activation])
