"""Helpers for the forged-checkpoint tests: a real small checkpoint, and ways to rewrite it."""
import io
import json
import os
import pickle
import warnings
import zipfile

import numpy as np
import pytest
from numpy.lib import format as npformat


def small_checkpoint(folder):
    """Train a tiny model (NumPy layers, 2 steps) into folder; (checkpoint bytes, log path)."""
    from numgpt.config import get_config
    from numgpt.data import load_dataset
    from numgpt.trainer import train
    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("to be or not to be, that is the question é\n" * 100)
    import numgpt.data as d
    with pytest.MonkeyPatch.context() as mp:  # prepared data goes to the temp folder
        mp.setattr(d, "DATA_DIR", os.path.join(folder, "data-cache"))
        mp.setenv("NUMGPT_DATA_DIR", os.path.join(folder, "data-cache"))
        cfg = get_config("laptop", n_embd=8, n_head=2, n_layer=1, block_size=8, batch_size=2,
                         eval_iters=1, max_iters=2, eval_interval=1, kernels=False)
        out = os.path.join(folder, "run")
        train(cfg, load_dataset(corpus), out, quiet=True, sample_chars=0)
    with open(os.path.join(out, "ckpt.npz"), "rb") as f:
        return f.read(), os.path.join(out, "log.jsonl")


def members(blob):
    """[(name, bytes)] of a zip archive, in order."""
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def rezip(items):
    """A zip archive (stored, like np.savez) of [(name, bytes)]."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": some forgeries repeat a member
        for name, data in items:
            # zipfile cuts a name at its first NUL, and cannot write an empty one
            zf.writestr(name.split("\x00")[0] or ".npy", data)
    return buf.getvalue()


def npy(a):
    """The .npy bytes of an array of a plain dtype."""
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def npy_with_header(header, data):
    """An .npy member with a header written by hand (numpy's writer) and any data after it."""
    buf = io.BytesIO()
    npformat.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def with_meta(blob, meta_text):
    """The archive with its meta entry's JSON text replaced."""
    return rezip([(n, npy(np.array(meta_text)) if n == "meta.npy" else d)
                  for n, d in members(blob)])


def change_meta(blob, change):
    """The archive with change(meta dict) applied to its meta entry."""
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        meta = json.loads(str(np.load(io.BytesIO(zf.read("meta.npy")))[()]))
    change(meta)
    return with_meta(blob, json.dumps(meta))


def replace_member(blob, name, data):
    return rezip([(n, data if n == name else d) for n, d in members(blob)])


class Boom:
    """Unpickling this creates the marker file: the proof that a loader ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_payloads(marker):
    """Pickles that would create marker if loaded: raw, and as an object array's .npy."""
    raw = pickle.dumps(Boom(marker), protocol=2)
    buf = io.BytesIO()
    np.save(buf, np.array([Boom(marker)], dtype=object), allow_pickle=True)
    return raw, buf.getvalue()
