"""Checkpoints: one .npz of plain arrays plus a JSON header, loaded with allow_pickle=False.

    meta          JSON text: format, step, config, vocabulary, random-generator state, best val
    p.<name>      every parameter
    opt.<name>    the AdamW state (m.<param>, v.<param>, t)

Written to a temporary file in the same folder, fsynced, then renamed over the old one, so the
file on disk is always either the previous complete checkpoint or the new complete one.
"""
import io
import json
import os
import zipfile

import numpy as np

from .data import atomic_write_bytes

FORMAT = "numgpt-checkpoint-1"


class CheckpointError(Exception):
    """The file is not a usable numgpt checkpoint; the message is one line."""


def save_checkpoint(path, params, opt_state, meta):
    """Atomically write params (name -> array), optimizer state and a JSON-able meta dict."""
    arrays = {"meta": np.array(json.dumps(dict(meta, format=FORMAT)))}
    arrays.update({"p." + k: v for k, v in params.items()})
    arrays.update({"opt." + k: v for k, v in (opt_state or {}).items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path):
    """(params, opt_state, meta) from a checkpoint; never unpickles, refuses anything else."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    if magic[:2] != b"PK":  # an .npz is a zip archive
        if magic[:1] == b"\x80":
            raise CheckpointError(f"{path} is a pickle, not a numgpt checkpoint; refusing to load "
                                  "it (loading a checkpoint never runs code)")
        raise CheckpointError(f"{path} is not a numgpt checkpoint (not an .npz archive)"
                              if magic else f"{path} is empty")
    try:  # the sizes the archive claims, before anything is unpacked (a small file can claim GBs)
        with zipfile.ZipFile(path) as zf:
            claimed = sum(info.file_size for info in zf.infolist())
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupted ({type(e).__name__}: {e})") from None
    from .resources import available_bytes
    have = available_bytes()
    if have is not None and claimed > have:
        raise CheckpointError(f"{path} unpacks to {claimed / 1e9:.1f} GB, more than the "
                              f"{have / 1e9:.1f} GB of memory available; refusing to load it")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            if "meta" not in names:
                raise CheckpointError(f"{path} is not a numgpt checkpoint (no meta entry)")
            meta = json.loads(str(z["meta"][()]))
            params = {k[2:]: z[k] for k in names if k.startswith("p.")}
            opt = {k[4:]: z[k] for k in names if k.startswith("opt.")}
    except CheckpointError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise CheckpointError(f"{path} holds pickled objects; refusing to load it "
                                  "(loading a checkpoint never runs code)") from None
        raise CheckpointError(f"{path} is not a readable numgpt checkpoint ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupted ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a numgpt checkpoint (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    return params, opt, meta


def read_model_checkpoint(path):
    """Load and check a checkpoint for use: (Config, vocabulary chars, params, opt_state, meta).

    Beyond load_checkpoint: the config is valid and fits in memory, the vocabulary is a list of
    distinct single characters of the config's size, and every parameter is finite and of the
    config's shape. Any failure is a one-line CheckpointError (or ConfigError for memory).
    """
    from .config import ConfigError, config_from_dict
    from .resources import check_memory, num_params
    params, opt, meta = load_checkpoint(path)
    try:
        cfg = config_from_dict(meta["config"])
    except KeyError:
        raise CheckpointError(f"{path} has no config in its header") from None
    except (ConfigError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} holds an invalid config ({e})") from None
    vocab = meta.get("vocab")
    if not (isinstance(vocab, list) and all(isinstance(c, str) and len(c) == 1 for c in vocab)
            and len(set(vocab)) == len(vocab) and len(vocab) == cfg.vocab_size):
        raise CheckpointError(f"{path} holds a broken vocabulary (it must be {cfg.vocab_size} "
                              "distinct characters)")
    step = meta.get("step")
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise CheckpointError(f"{path} has a broken step count ({step!r})")
    n = sum(int(a.size) for a in params.values())
    if n != num_params(cfg):
        raise CheckpointError(f"{path} holds {n:,} parameter values, but its config needs "
                              f"{num_params(cfg):,}")
    check_memory(cfg, "sample")
    from .model import param_shapes
    shapes = param_shapes(cfg)
    for name, a in params.items():
        if name not in shapes or a.shape != tuple(shapes[name]):
            raise CheckpointError(f"{path} is inconsistent: parameter {name} has shape {a.shape}, "
                                  f"the config needs {shapes.get(name)}")
        if a.dtype.kind != "f":
            raise CheckpointError(f"{path} is inconsistent: parameter {name} has dtype {a.dtype}")
        if not np.isfinite(a).all():
            raise CheckpointError(f"{path} is corrupted: parameter {name} holds NaN or infinite "
                                  "values")
    missing = set(shapes) - set(params)
    if missing:
        raise CheckpointError(f"{path} is inconsistent: parameter {sorted(missing)[0]} is missing")
    return cfg, vocab, params, opt, meta
