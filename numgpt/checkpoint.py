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
