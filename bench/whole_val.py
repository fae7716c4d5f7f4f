"""The validation loss of trained runs over the whole validation text, not a sample of it.

train.py's evaluations during a run are means over eval_iters random batches
(trainer.estimate_loss): cheap, and near enough to follow a curve, but two checkpoints compared by
them differ by the luck of their batches as well (in the 10-minute runs of docs/recipes.md, by up
to 0.02 from the whole text's loss). This cuts the validation split into consecutive windows of
the model's block_size, each predicting its block_size next characters, so every character of
the split but the first is predicted once, and prints the mean loss of those predictions
(trainer.whole_text_loss, as a run's last evaluation computes it): the same number on every
call, for comparing checkpoints, including those of runs stopped early or made before the last
evaluation read the whole text.

    python bench/whole_val.py OUT_DIR [OUT_DIR ...]    # each a train.py out_dir with ckpt.npz

The text is the one the run trained on (its checkpoint names it), or --data=PATH.
"""
import argparse
import os
import sys

from numgpt import GPT
from numgpt.checkpoint import CheckpointError, read_model_checkpoint
from numgpt.config import ConfigError
from numgpt.data import DataError, load_dataset
from numgpt.trainer import text_windows, whole_text_loss, whole_val_rows


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
            rows = whole_val_rows(cfg)
            loss = whole_text_loss(model, ds.val, cfg.block_size, rows)
            n = text_windows(ds.val, cfg.block_size)[1].size
        except (CheckpointError, ConfigError, DataError, OSError, ValueError) as e:
            sys.exit(f"error: {out_dir}: {e}")
        print(f"{out_dir}: step {meta['step']}, val over the whole validation text "
              f"({n:,} characters) {loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
