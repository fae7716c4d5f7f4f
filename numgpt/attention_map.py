"""Draw every layer's and head's causal attention for a text, from a checkpoint, as one PNG grid.

    python -m numgpt.attention_map --out_dir=out --text="To be or not" --png=attention.png

One panel per (layer, head): row i is query position i, column j key position j, the colour the
attention probability P[i, j] (each row sums to 1; above the diagonal it is exactly 0, the causal
mask). The characters of the text label both axes. The probabilities are read from the forward
cache of the NumPy reference layers (numgpt/layers/attention.py), so the map shows the very P
that attention_forward computes and attention_backward differentiates.
"""
import io
import os
import sys

import numpy as np

from .checkpoint import CheckpointError, read_model_checkpoint
from .config import ConfigError
from .data import DataError, Vocab, atomic_write_bytes

HELP = """usage: python -m numgpt.attention_map [--out_dir=DIR] [--text=TEXT] [--png=FILE] [--overwrite]

Draws the causal attention of every layer and head of the checkpoint in out_dir (default: out) on
TEXT as a grid of heatmaps (layers down, heads across), characters on the axes.
  --out_dir=DIR   the run folder holding ckpt.npz (default: out)
  --text=TEXT     the characters to look at; all must be in the model's vocabulary; only the last
                  block_size of them are used (default: "To be or not to be")
  --png=FILE      where the picture goes (default: DIR/attention.png); an existing file is
                  replaced only with --overwrite
"""

DEFAULT_TEXT = "To be or not to be"


def attention_probs(cfg, params, ids):
    """The causal attention probabilities of a GPT on one sequence.

    cfg, params: a model (cfg.model == "gpt"); ids: [T] token ids, T <= block_size.
    Returns a float64 array [n_layer, n_head, T, T]: P[l, h, i, j], the weight query i of head h in
    block l gives key j (softmax over j <= i; 0 for j > i). Runs the NumPy reference layers in
    float64 (kernels off, no dropout): the forward cache of multihead_forward holds
    (cq, ck, cv, ca, ...) and ca = (q, k, v, p, ...) from attention_forward.
    """
    from .model import GPT
    if cfg.model != "gpt":
        raise ConfigError("this model has no attention (it is a bigram table)")
    model = GPT(cfg.replace(kernels=False, dropout=0.0), dtype=np.float64, params=params)
    ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
    _, cache = model.forward(ids, train=False)
    out = []
    for block_cache in cache["blocks"]:
        ca = block_cache["attn"][3]  # attention_forward's cache
        p = ca[3]                    # [B=1, H, T, T], before dropout
        out.append(p[0])
    return np.stack(out)


def _label(c):
    """A character as a tick label that can be seen: space, newline and tab made visible."""
    return {" ": "\u2423", "\n": "\\n", "\t": "\\t", "$": r"\$"}.get(c, c)


def draw_attention(probs, chars, path, title=""):
    """probs [L, H, T, T] and the T characters -> a PNG grid of L x H heatmaps at path (atomic)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    L, H, T, _ = probs.shape
    side = max(2.2, min(4.5, 0.22 * T + 0.9))
    fig, axes = plt.subplots(L, H, figsize=(side * H + 0.8, side * L + 0.7), dpi=100,
                             squeeze=False)
    step = max(1, int(np.ceil(T / 40)))  # at most ~40 labelled ticks per axis
    ticks = list(range(0, T, step))
    labels = [_label(chars[t]) for t in ticks]
    fontsize = 9 if T <= 24 else 7
    im = None
    for l in range(L):
        for h in range(H):
            ax = axes[l][h]
            shown = np.ma.masked_where(np.triu(np.ones((T, T), bool), k=1), probs[l, h])
            im = ax.imshow(shown, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
            ax.set_facecolor("#eeeeee")  # the masked future, above the diagonal
            ax.set_xticks(ticks)
            ax.set_xticklabels(labels, fontsize=fontsize, fontfamily="monospace")
            ax.set_yticks(ticks)
            ax.set_yticklabels(labels, fontsize=fontsize, fontfamily="monospace")
            ax.tick_params(length=0, pad=1)
            ax.set_title(f"layer {l} head {h}", fontsize=9)
            every = "" if step == 1 else f", every {step}{'nd' if step == 2 else 'th'} labelled"
            if l == L - 1:
                ax.set_xlabel(f"key (attended to{every})", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"query (attending{every})", fontsize=8)
    fig.suptitle(title or "causal attention", fontsize=10)
    if T > 16:  # long tick rows need the spacing worked out; short ones fit the default (faster)
        fig.tight_layout()
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="attention probability")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def attention_map(cfg, chars, params, text, path, title=""):
    """Encode text (its last block_size characters), compute the probabilities and draw them.
    Returns (probs, the text used)."""
    if cfg.model != "gpt":
        raise ConfigError("this model has no attention (it is a bigram table)")
    used = text[-cfg.block_size:]
    ids = Vocab(chars).encode(used)
    probs = attention_probs(cfg, params, ids)
    draw_attention(probs, used, path, title)
    return probs, used


def ladder_map(ds, run_dir, rung):
    """The ladder's map of one trained rung: its checkpoint in run_dir on the first block_size
    characters of DEFAULT_TEXT (or of the val split when the data lacks one of them), written to
    run_dir/attention.png (a folder the ladder has just made). Returns the path."""
    cfg, chars, params, _, meta = read_model_checkpoint(os.path.join(run_dir, "ckpt.npz"))
    text = DEFAULT_TEXT[:cfg.block_size]
    if any(c not in ds.vocab.stoi for c in text) or len(text) < cfg.block_size:
        text = ds.vocab.decode(ds.val[:cfg.block_size])
    path = os.path.join(run_dir, "attention.png")
    attention_map(cfg, chars, params, text, path,
                  f"{rung} after {meta['step']} steps: {_grid(cfg)}")
    return path


def _grid(cfg):
    return (f"{cfg.n_layer} layer{'s' * (cfg.n_layer > 1)} x "
            f"{cfg.n_head} head{'s' * (cfg.n_head > 1)}")


def main(argv):
    from .cli import parse_flags
    if any(a in ("-h", "--help") for a in argv):
        print(HELP)
        return 0
    opts = parse_flags(argv, {"out_dir", "text", "png"}, flags=("overwrite",))
    for key in ("out_dir", "png"):
        if key in opts and not opts[key]:
            raise ConfigError(f"--{key} is empty; give a path or leave the option out")
    out_dir = opts.get("out_dir", "out")
    text = opts.get("text", DEFAULT_TEXT)
    png = opts.get("png") or os.path.join(out_dir, "attention.png")
    ckpt = os.path.join(out_dir, "ckpt.npz")
    if not os.path.isfile(ckpt):
        raise CheckpointError(f"no checkpoint at {ckpt}; train one first with python train.py "
                              "(or pass --out_dir)")
    if not text:
        raise DataError("--text is empty; give at least one character")
    if not png.lower().endswith(".png"):
        raise ConfigError(f"--png must name a .png file, got {png!r}")
    if os.path.isdir(png):
        raise ConfigError(f"--png {png} is a folder; name a .png file")
    if os.path.exists(png) and not opts.get("overwrite"):
        raise ConfigError(f"{png} already exists; pass --overwrite to replace it or choose another "
                          "--png")
    folder = os.path.dirname(os.path.abspath(png))
    if not os.path.isdir(folder):
        raise ConfigError(f"the folder of --png ({folder}) does not exist")
    cfg, chars, params, _, meta = read_model_checkpoint(ckpt)
    if cfg.model != "gpt":
        raise ConfigError(f"the model in {ckpt} is a bigram table; it has no attention to draw")
    if len(text) > cfg.block_size:
        print(f"the text has {len(text)} characters, more than block_size {cfg.block_size}; "
              f"using its last {cfg.block_size}")
    title = f"{ckpt} (step {meta['step']}): {_grid(cfg)}, {min(len(text), cfg.block_size)} characters"
    _, used = attention_map(cfg, chars, params, text, png, title)
    print(f"wrote {png}: {_grid(cfg)} on {used!r}")
    return 0


if __name__ == "__main__":
    from .cli import run
    sys.exit(run(lambda argv: main(argv)))
