"""The validation loss of trained runs over the whole validation text, not a sample of it.

train.py's evaluations are means over eval_iters random batches (trainer.estimate_loss): cheap,
and near enough to follow a curve, but two runs compared by their last evaluation differ by the
luck of their batches as well (in the 10-minute runs of docs/recipes.md, by up to 0.02 from the
whole text's loss). This cuts the validation split into consecutive windows of the model's
block_size, each predicting its block_size next characters, so every character of the split but
the first is predicted once, and prints the mean loss of those predictions: the same number on
every call, for comparing runs.

    python bench/whole_val.py OUT_DIR [OUT_DIR ...]    # each a train.py out_dir with ckpt.npz

The text is the one the run trained on (its checkpoint names it), or --data=PATH.
"""
import argparse
import os
import sys

import numpy as np

from numgpt import GPT
from numgpt.checkpoint import CheckpointError, read_model_checkpoint
from numgpt.config import ConfigError
from numgpt.data import DataError, load_dataset

BATCH = 64  # windows a forward pass


def windows(ids, block_size):
    """(x, y): the ids cut into consecutive windows of block_size and the ids one place on; the
    tail too short for a window is left out."""
    n = (len(ids) - 1) // block_size
    x = ids[:n * block_size].reshape(n, block_size)
    y = ids[1:n * block_size + 1].reshape(n, block_size)
    return x, y


def whole_val_loss(model, val_ids):
    """Mean cross-entropy of model's predictions over every window of val_ids (all of one size,
    so the mean of the windows' means is the mean over their characters)."""
    x, y = windows(np.asarray(val_ids, dtype=np.int64), model.cfg.block_size)
    if len(x) == 0:
        raise ValueError(f"the validation text is shorter than one block ({model.cfg.block_size})")
    total = 0.0
    for i in range(0, len(x), BATCH):
        total += model.loss(x[i:i + BATCH], y[i:i + BATCH]) * len(x[i:i + BATCH])
    return total / len(x), x.size


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dirs", nargs="+", metavar="OUT_DIR")
    ap.add_argument("--data", help="the text file the runs trained on (default: what the "
                    "checkpoint names, else Tiny Shakespeare)")
    args = ap.parse_args(argv)
    for out_dir in args.out_dirs:
        try:
            cfg, chars, params, _, meta = read_model_checkpoint(os.path.join(out_dir, "ckpt.npz"))
            src = args.data or meta.get("data")
            ds = load_dataset(src if isinstance(src, str) and os.path.isfile(src) else None)
            if ds.vocab.chars != chars:
                sys.exit(f"error: {out_dir} was trained on another text's vocabulary; give --data")
            model = GPT(cfg, seed=0)
            model.set_params(params)
            loss, n = whole_val_loss(model, ds.val)
        except (CheckpointError, ConfigError, DataError, OSError, ValueError) as e:
            sys.exit(f"error: {out_dir}: {e}")
        print(f"{out_dir}: step {meta['step']}, val over the whole validation text "
              f"({n:,} characters) {loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
