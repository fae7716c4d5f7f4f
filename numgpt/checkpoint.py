"""Checkpoints: one .npz of plain arrays plus a JSON header, loaded with allow_pickle=False.

    meta          JSON text: format, step, config, vocabulary, random-generator state, best val
    p.<name>      every parameter
    opt.<name>    the AdamW state (m.<param>, v.<param>, t)

Written to a temporary file in the same folder, fsynced, then renamed over the old one, so the
file on disk is always either the previous complete checkpoint or the new complete one.
"""
import io
import json
import lzma
import math
import os
import struct
import tokenize
import warnings
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npformat

from .data import atomic_write_bytes

FORMAT = "numgpt-checkpoint-1"


class CheckpointError(Exception):
    """The file is not a usable numgpt checkpoint; the message is one line."""


def checkpoint_bytes(params, opt_state, meta):
    """The .npz file of a checkpoint of params (name -> array), optimizer state and meta."""
    arrays = {"meta": np.array(json.dumps(dict(meta, format=FORMAT)))}
    arrays.update({"p." + k: v for k, v in params.items()})
    arrays.update({"opt." + k: v for k, v in (opt_state or {}).items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def save_checkpoint(path, params, opt_state, meta):
    """Atomically write params (name -> array), optimizer state and a JSON-able meta dict."""
    atomic_write_bytes(path, checkpoint_bytes(params, opt_state, meta))


def _short(e, limit=120):
    """An exception's message cut to one short line (a forged file can make it long)."""
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[:limit] + "..."


def _size(n):
    """A byte count for people: 512 bytes, 3.2 MB, 4.0 TB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# the array kinds a checkpoint holds: numbers, and the meta entry's text. Everything else (objects,
# which would need pickle; raw bytes; records; dates) is refused before a byte of data is read.
KINDS = "biufcU"

# what a broken archive or member raises while it is opened, decompressed or read
_ZIP_ERRORS = (OSError, EOFError, ValueError, KeyError, RuntimeError, NotImplementedError,
               OverflowError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, struct.error)


def _read_member(path, zf, info):
    """The array in one .npy member of the archive, its header checked before any data is read:
    a plain dtype, and a declared shape * itemsize that is exactly the data the member holds
    (a forged header cannot make us allocate what the file does not contain)."""
    name = _short(info.filename[:-4], 60)  # for messages: a forged name may hold line breaks
    with zf.open(info) as f:
        try:
            version = npformat.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy version {version}")
            read_header = (npformat.read_array_header_1_0 if version == (1, 0)
                           else npformat.read_array_header_2_0)
            with warnings.catch_warnings():  # a header in Python 2's style warns as it parses
                warnings.simplefilter("ignore")
                shape, fortran, dtype = read_header(f)
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError, EOFError,
                tokenize.TokenError) as e:
            # MemoryError: the parser's stack, on a few kB of nested operators; nothing is big.
            # TokenError: NumPy retries a header that does not parse as Python 2's, through
            # tokenize, which raises it on an unclosed bracket
            raise CheckpointError(f"{path} is corrupted: member {name} is not a readable .npy "
                                  f"array ({type(e).__name__}: {_short(e)})") from None
        if dtype.hasobject:
            raise CheckpointError(f"{path} holds pickled objects (member {name}); refusing to "
                                  "load it (loading a checkpoint never runs code)")
        if dtype.kind not in KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise CheckpointError(f"{path} is not a numgpt checkpoint (member {name} has dtype "
                                  f"{dtype})")
        if any(n < 0 for n in shape):
            raise CheckpointError(f"{path} is corrupted: member {name} has shape {shape}")
        count = math.prod(shape)
        want = count * dtype.itemsize
        have = info.file_size - f.tell()
        if want != have:
            raise CheckpointError(f"{path} is corrupted or forged: member {name} claims a "
                                  f"{'x'.join(map(str, shape)) or 'scalar'} {dtype} array "
                                  f"({_size(want)}) but holds {_size(max(have, 0))} of data; "
                                  "refusing to load it")
        flat = np.empty(count, dtype=dtype)
        buf = memoryview(flat.view(np.uint8))
        got = 0
        while got < want:
            n = f.readinto(buf[got:])
            if not n:
                raise EOFError(f"member {name} ends early")
            got += n
        if f.read(1):  # also where the zip module checks the member's CRC
            raise ValueError(f"member {name} is longer than its header says")
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def load_checkpoint(path):
    """(params, opt_state, meta) from a checkpoint; never unpickles, refuses anything else.

    Read with the zip module and numpy's .npy header parser, never np.load: every member must be
    an .npy array of a plain dtype whose header's shape matches its size, and the archive's
    claimed sizes must fit in memory, all checked before any array is allocated.
    """
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
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            # the sizes the archive claims, before anything is unpacked (a small file can
            # claim GBs)
            claimed = sum(info.file_size for info in infos)
            from .resources import available_bytes
            have = available_bytes()
            if have is not None and claimed > have:
                raise CheckpointError(f"{path} unpacks to {claimed / 1e9:.1f} GB, more than the "
                                      f"{have / 1e9:.1f} GB of memory available; refusing to load "
                                      "it")
            members = {}
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise CheckpointError(f"{path} is not a numgpt checkpoint (member "
                                          f"{_short(repr(info.filename), 60)} is not an .npy "
                                          "array)")
                if info.filename[:-4] in members:
                    raise CheckpointError(f"{path} is corrupted: it holds member "
                                          f"{_short(info.filename[:-4], 60)} twice")
                members[info.filename[:-4]] = info
            if "meta" not in members:
                raise CheckpointError(f"{path} is not a numgpt checkpoint (no meta entry)")
            text = _read_member(path, zf, members["meta"])
            if text.dtype.kind != "U" or text.shape != ():
                raise CheckpointError(f"{path} is not a numgpt checkpoint (its meta entry is a "
                                      f"{text.dtype} array of shape {text.shape}, not text)")
            try:
                meta = json.loads(str(text[()]))
            except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
                raise CheckpointError(f"{path} has a broken meta entry ({type(e).__name__}: "
                                      f"{_short(e)})") from None
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                fmt = meta.get("format") if isinstance(meta, dict) else None
                raise CheckpointError(f"{path} is not a numgpt checkpoint (format "
                                      f"{_short(repr(fmt), 60)})")
            params = {k[2:]: _read_member(path, zf, i) for k, i in members.items()
                      if k.startswith("p.")}
            opt = {k[4:]: _read_member(path, zf, i) for k, i in members.items()
                   if k.startswith("opt.")}
    except CheckpointError:
        raise
    except _ZIP_ERRORS as e:
        raise CheckpointError(f"{path} is truncated or corrupted ({type(e).__name__}: "
                              f"{_short(e)})") from None
    return params, opt, meta


def _finite32(a):
    """Whether every value of a float array is finite once stored in float32 (the dtype train.py
    and sample.py use: 1e300 in a float64 checkpoint would become inf)."""
    if a.dtype.itemsize > 4:
        with np.errstate(over="ignore"):
            a = a.astype(np.float32)
    return bool(np.isfinite(a).all())


def _real(x):
    """A JSON number (an int or float, not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _whole(x, lo, hi):
    """A JSON whole number (not a bool) in [lo, hi)."""
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x < hi


def _check_rng_state(state):
    """Why state is not the state of a NumPy PCG64 generator as train.py saves it; None if it is."""
    if not isinstance(state, dict) or set(state) != {"bit_generator", "state", "has_uint32",
                                                     "uinteger"}:
        return "the random-generator state is not a PCG64 state"
    if state["bit_generator"] != "PCG64":
        return "the random generator is not PCG64"
    inner = state["state"]
    if not (isinstance(inner, dict) and set(inner) == {"state", "inc"}
            and all(_whole(inner[k], 0, 2 ** 128) for k in inner)):
        return "the random-generator state must hold two whole numbers in [0, 2**128)"
    if not (_whole(state["has_uint32"], 0, 2) and _whole(state["uinteger"], 0, 2 ** 32)):
        return "the random generator's buffered word is broken"
    try:  # what resume does with it, on a generator of its own
        np.random.Generator(np.random.PCG64()).bit_generator.state = state
    except (ValueError, TypeError, OverflowError, KeyError) as e:
        return f"the random-generator state is refused ({type(e).__name__}: {_short(e)})"
    return None


def _check_opt_state(opt, shapes):
    """Why opt is not the AdamW state of parameters of these shapes; None if it is."""
    want = {"t"} | {slot + k for k in shapes for slot in ("m.", "v.")}
    extra, missing = set(opt) - want, want - set(opt)
    if extra:
        return f"unexpected entry opt.{_short(sorted(extra)[0], 60)}"
    if missing:
        return f"entry opt.{sorted(missing)[0]} is missing"
    t = opt["t"]
    if t.shape != () or t.dtype.kind not in "iu" or not 0 <= int(t) < 2 ** 40:
        return f"the step count t must be a whole number in [0, 2**40), got {t.dtype} {t.shape}"
    for name, shape in shapes.items():
        for slot in ("m.", "v."):
            a = opt[slot + name]
            if a.shape != tuple(shape) or a.dtype.kind != "f":
                return (f"opt.{slot + name} must be floats of shape {tuple(shape)}, got "
                        f"{a.dtype} {a.shape}")
            if not _finite32(a):
                return f"opt.{slot + name} holds NaN or infinite values"
            if slot == "v." and (a < 0).any():
                return f"opt.{slot + name} holds negative values (a running mean of squares)"
    return None


def read_model_checkpoint(path):
    """Load and check a checkpoint for use: (Config, vocabulary chars, params, opt_state, meta).

    Beyond load_checkpoint: the config is valid and fits in memory, the vocabulary is a list of
    distinct single characters of the config's size, the step count is a whole number, every
    parameter is finite (in float32) and of the config's shape, and what --resume reads is sound
    where present: the best val loss a number (finite, or Infinity before any evaluation), the
    random-generator state a PCG64 state, the optimizer state finite floats of the parameters'
    shapes with v >= 0 and a whole step count. Any failure is a one-line CheckpointError (or
    ConfigError for memory).
    """
    from .config import ConfigError, config_from_dict
    from .resources import check_memory, num_params
    params, opt, meta = load_checkpoint(path)
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path} has no config in its header" if "config" not in meta
                              else f"{path} holds an invalid config (not a JSON object)")
    try:
        cfg = config_from_dict(meta["config"])
    except (ConfigError, TypeError, AttributeError, OverflowError) as e:
        raise CheckpointError(f"{path} holds an invalid config ({_short(e)})") from None
    vocab = meta.get("vocab")
    if not (isinstance(vocab, list) and all(isinstance(c, str) and len(c) == 1 for c in vocab)
            and len(set(vocab)) == len(vocab) and len(vocab) == cfg.vocab_size):
        raise CheckpointError(f"{path} holds a broken vocabulary (it must be {cfg.vocab_size} "
                              "distinct characters)")
    step = meta.get("step")
    if not _whole(step, 0, 2 ** 63):
        raise CheckpointError(f"{path} has a broken step count ({_short(repr(step), 60)})")
    best = meta.get("best_val", math.inf)
    if not (_real(best) and (math.isfinite(best) or best == math.inf)):
        raise CheckpointError(f"{path} has a broken best val loss ({_short(repr(best), 60)})")
    n, needed = sum(int(a.size) for a in params.values()), num_params(cfg)
    if n != needed:  # (a forged config can ask for a number hundreds of digits long)
        shown = f"{needed:,}" if needed < 10 ** 15 else f"over 10^{len(str(needed)) - 1}"
        raise CheckpointError(f"{path} holds {n:,} parameter values, but its config needs "
                              f"{shown}")
    check_memory(cfg, "sample")
    from .model import param_shapes
    shapes = param_shapes(cfg)
    for name, a in params.items():
        if name not in shapes or a.shape != tuple(shapes[name]):
            raise CheckpointError(f"{path} is inconsistent: parameter {_short(name, 60)} has shape "
                                  f"{a.shape}, the config needs {shapes.get(name)}")
        if a.dtype.kind != "f":
            raise CheckpointError(f"{path} is inconsistent: parameter {_short(name, 60)} has dtype {a.dtype}")
        if not _finite32(a):
            raise CheckpointError(f"{path} is corrupted: parameter {_short(name, 60)} holds NaN or infinite "
                                  "values (in float32)")
    missing = set(shapes) - set(params)
    if missing:
        raise CheckpointError(f"{path} is inconsistent: parameter {sorted(missing)[0]} is missing")
    why = (_check_rng_state(meta["rng_state"]) if "rng_state" in meta else None) or (
        _check_opt_state(opt, shapes) if opt else None)
    if why:
        raise CheckpointError(f"{path} holds a broken optimizer or random-generator state ({why})")
    return cfg, vocab, params, opt, meta
