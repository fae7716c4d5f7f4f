"""Fuzzing the checkpoint loader and the log reader with hypothesis (issue 16), bounded in examples.

A real small checkpoint's bytes are mutated (bytes flipped, inserted, deleted, truncated; members
renamed, dropped, duplicated, refilled with random bytes or with pickles that would create a
marker file; .npy headers and meta rewritten with random JSON) and loaded. The property: the
loader returns a checkpoint that works for sampling and resuming, or raises CheckpointError (or
ConfigError for memory) with one line; nothing else, and no pickle ever runs. log.jsonl gets random
lines; read_log never raises and returns only sound rows.
"""
import io
import json
import math
import os
import warnings

import numpy as np
import pytest
from ckpt_tools import members, npy, npy_with_header, pickle_payloads, rezip, small_checkpoint
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from numgpt.checkpoint import CheckpointError, read_model_checkpoint
from numgpt.config import ConfigError
from numgpt.trainer import read_log

CKPT_EXAMPLES = 400
LOG_EXAMPLES = 300
FUZZ = settings(max_examples=CKPT_EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


class Base:
    """The real checkpoint the mutations start from (short in hypothesis's reports)."""

    def __init__(self, folder):
        self.blob, _ = small_checkpoint(folder)
        with np.load(os.path.join(folder, "run", "ckpt.npz")) as z:
            self.meta = json.loads(str(z["meta"][()]))
        self.folder = folder
        self.marker = os.path.join(folder, "PWNED")  # what the pickles would create

    def __repr__(self):
        return "<a small checkpoint>"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return Base(str(tmp_path_factory.mktemp("fuzz")))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-2 ** 200, 2 ** 200)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)

DESCRS = ["<f4", "<f8", ">f4", "<f2", "<i8", "|u1", "|b1", "<c8", "<U3", "|O", "|S2", "|V4",
          "<M8[s]", [("a", "<f4")], "<f4 garbage", 3]


def _meta_paths(meta):
    """Every key path into meta (top level, rng_state and config fields)."""
    paths = [(k,) for k in meta] + [("rng_state", "state", "state"), ("rng_state", "state", "inc"),
                                    ("rng_state", "has_uint32"), ("rng_state", "uinteger"),
                                    ("rng_state", "bit_generator"), ("rng_state", "state")]
    return paths + [("config", k) for k in meta["config"]] + [("vocab", 0)]


def near(value):
    """Values like value, at its edges or just past them: the checks' boundaries."""
    if isinstance(value, bool):
        return st.sampled_from([not value, 0, 1, "true", None])
    if isinstance(value, int):
        as_float = float(max(min(value, 2 ** 1000), -2 ** 1000))
        return st.sampled_from([0, -1, 1, value + 1, value - 1, 2 ** 32, 2 ** 63, 2 ** 64, 2 ** 128,
                                2 ** 128 - 1, 10 ** 400, as_float, str(value), True]) \
            | st.integers(-2 * abs(value) - 2, 2 * abs(value) + 2)
    if isinstance(value, float):
        return st.sampled_from([0.0, -0.0, 1.0, -value, value * 1e30, 1e-50, 1e308, math.inf,
                                -math.inf, math.nan, 1, True, str(value)]) | st.floats()
    if isinstance(value, str):
        return st.sampled_from(["", value + "x", value.upper(), value[:-1]]) | st.text(max_size=3)
    if isinstance(value, list):
        return st.sampled_from([value[:-1], value + value[:1], value[::-1], [],
                                value[:1] * len(value)])
    return json_values


@st.composite
def meta_rewrites(draw, meta):
    """The meta entry's text: the real meta with fields set to random JSON, or any JSON at all."""
    how = draw(st.sampled_from(["field"] * 6 + ["any", "deep", "text"]))
    if how == "any":
        return json.dumps(draw(json_values))
    if how == "deep":
        n = draw(st.integers(1000, 200000))
        return draw(st.sampled_from(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n,
                                     '{"format": "numgpt-checkpoint-1", "step": ' + "[" * n]))
    if how == "text":
        return draw(st.text(max_size=50))
    paths = _meta_paths(meta)
    meta = json.loads(json.dumps(meta))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        node = meta
        try:
            for k in path[:-1]:
                node = node[k]
            how = draw(st.sampled_from(["drop", "any", "near", "near"]))
            if how == "drop" and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = draw(json_values if how == "any" else near(node[path[-1]]))
        except (KeyError, IndexError, TypeError):
            pass  # an earlier rewrite changed the structure
    return json.dumps(meta)


@st.composite
def npy_members(draw):
    """An .npy member with a random header, data of about the right size or not."""
    shape = tuple(draw(st.lists(st.integers(-2, 2 ** 40) | st.integers(0, 9), max_size=4)))
    header = {"descr": draw(st.sampled_from(DESCRS)), "fortran_order": draw(st.booleans()),
              "shape": shape}
    n = draw(st.integers(0, 256))
    try:
        return npy_with_header(header, draw(st.binary(min_size=n, max_size=n)))
    except (ValueError, TypeError):  # a header numpy's writer refuses: write it by hand
        text = repr(header).encode("latin1", "replace")
        return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


@st.composite
def mutated_checkpoints(draw, base):
    meta, marker = base.meta, base.marker
    items = members(base.blob)
    # most examples change one thing, so that the checks after the first are reached too
    plan = draw(st.sampled_from(["one field"] * 4 + ["one array"] * 2 + ["one change"] * 2
                                + ["several"] * 2))
    ops = {"one field": ["meta"], "one array": ["array"]}.get(plan, [
        "rename", "drop", "dup", "random", "resize", "pickle", "meta", "header", "add", "array"])
    for _ in range(draw(st.integers(1, 3)) if plan == "several" else 1):
        op = draw(st.sampled_from(ops))
        i = draw(st.integers(0, len(items) - 1)) if items else None
        if i is None:
            items.append(("meta.npy", b""))
            continue
        name, data = items[i]
        if op == "rename":
            new = draw(st.sampled_from(["meta", "meta.npy", "p.tok_emb.npy", "opt.t.npy", "p..npy",
                                        name[:-4], name + ".npy", "x/" + name])
                       | st.text(max_size=12))
            items[i] = (new, data)  # (rezip writes '' and names cut at a NUL as zipfile can)
        elif op == "drop":
            del items[i]
        elif op == "dup":
            items.insert(draw(st.integers(0, len(items))), items[i])
        elif op == "random":
            items[i] = (name, draw(st.binary(max_size=300)))
        elif op == "resize":
            k = draw(st.integers(0, len(data) + 64))
            items[i] = (name, data[:k] if k <= len(data) else data + bytes(k - len(data)))
        elif op == "pickle":
            items[i] = (name, draw(st.sampled_from(pickle_payloads(marker))))
        elif op == "meta":
            items = [(n, npy(np.array(draw(meta_rewrites(meta)))) if n == "meta.npy" else d)
                     for n, d in items]
        elif op == "header":
            items[i] = (name, draw(npy_members()))
        elif op == "add":
            items.append((draw(st.sampled_from(["p.", "opt.", "opt.m.", "opt.v.", ""]))
                          + draw(st.text(max_size=8)) + ".npy", draw(npy_members())))
        else:  # a well-formed array of another value, dtype or shape in a member's place
            value = draw(st.sampled_from([np.nan, np.inf, -1.0, 1e300, 0.0, 7, True, 1j, 1e-45]))
            try:
                same = np.load(io.BytesIO(data)).shape
            except Exception:  # an earlier change broke this member
                same = (8,)
            shape = draw(st.sampled_from([same, same, (), (1,), same[::-1], same + (1,)]))
            dtype = draw(st.sampled_from([np.float32, np.float64, np.int64, np.bool_,
                                          np.complex64, None]))
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", np.exceptions.ComplexWarning)  # 1j as a real
                items[i] = (name, npy(np.full(shape, value, dtype=dtype)))
    out = rezip(items)
    for _ in range(draw(st.integers(0, 2)) if plan in ("one change", "several") else 0):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "overwrite"]))
        pos = draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "flip" and out:
            out = out[:pos] + bytes([out[pos] ^ draw(st.integers(1, 255))]) + out[pos + 1:]
        elif op == "insert":
            out = out[:pos] + draw(st.binary(min_size=1, max_size=16)) + out[pos:]
        elif op == "delete":
            out = out[:pos] + out[pos + draw(st.integers(1, 16)):]
        elif op == "truncate":
            out = out[:pos]
        else:
            chunk = draw(st.binary(min_size=1, max_size=16))
            out = out[:pos] + chunk + out[pos + len(chunk):]
    return out


def usable(cfg, chars, params, opt_state, meta):
    """What sample.py and --resume do with a loaded checkpoint, none of which may fail."""
    import numgpt
    from numgpt.model import GPT
    model = GPT(cfg.replace(kernels=False), dtype=np.float32, params=params)
    assert all(np.isfinite(v).all() for v in model.params.values())
    assert len(chars) == cfg.vocab_size and isinstance(meta["step"], int)
    if opt_state:
        numgpt.make_optimizer(model, cfg).load_state_dict(opt_state)
    if "rng_state" in meta:
        np.random.default_rng(0).bit_generator.state = meta["rng_state"]
    best = float(meta.get("best_val", math.inf))
    assert not math.isnan(best)


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_loader(base, data):
    path = os.path.join(base.folder, "fuzzed.npz")
    with open(path, "wb") as f:
        f.write(data.draw(mutated_checkpoints(base), label="checkpoint"))
    try:
        loaded = read_model_checkpoint(path)
    except (CheckpointError, ConfigError) as e:
        msg = str(e)
        assert msg and "\n" not in msg and len(msg) < 500, msg
        event(" ".join(msg.replace(path, "FILE").split()[:6]))  # --hypothesis-show-statistics
    else:
        usable(*loaded)
        event("returned")
    assert not os.path.exists(base.marker), "a pickle ran"


LOG_KEYS = ("step", "train_loss", "val_loss", "lr", "time")
log_values = st.one_of(
    st.integers(-3, 10 ** 6), st.integers(-2 ** 70, 2 ** 70), st.booleans(), st.none(),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), json_values)


@st.composite
def log_lines(draw):
    how = draw(st.sampled_from(["row", "row", "row", "json", "text", "deep", "huge int"]))
    if how == "row":
        row = {k: draw(st.integers(0, 10 ** 6) if k == "step" else st.floats(0, 10))
               for k in LOG_KEYS}
        for k in draw(st.lists(st.sampled_from(LOG_KEYS + ("extra",)), max_size=3)):
            if draw(st.booleans()):
                row.pop(k, None)
            else:
                row[k] = draw(log_values)
        return json.dumps(row)  # Python's json writes NaN and Infinity, and reads them back
    if how == "json":
        return json.dumps(draw(json_values))
    if how == "deep":
        n = draw(st.integers(1000, 100000))
        return "[" * n + "]" * n
    if how == "huge int":
        return '{"step": 1' + "0" * draw(st.integers(4000, 6000)) + ', "train_loss": 1, ' \
               '"val_loss": 1, "time": 1}'
    return draw(st.text(max_size=80))


def sound(row):
    def number(v):
        return type(v) in (int, float) and math.isfinite(v)
    return (set(row) <= set(LOG_KEYS) and type(row["step"]) is int and 0 <= row["step"] < 2 ** 63
            and all(number(row[k]) for k in ("train_loss", "val_loss", "time"))
            and row["time"] >= 0 and ("lr" not in row or number(row["lr"])))


@settings(FUZZ, max_examples=LOG_EXAMPLES)
@given(lines=st.lists(log_lines(), max_size=8), junk=st.binary(max_size=40))
def test_fuzz_log_reader(base, lines, junk):
    path = os.path.join(base.folder, "log.jsonl")
    with open(path, "wb") as f:
        f.write("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n" + junk)
    rows = read_log(path)
    assert all(sound(r) for r in rows), rows
    kept = [sound_line(ln) for ln in lines if ln.startswith("{")]
    kept = [r for r in kept if r is not None]
    assert rows[:len(kept)] == kept  # every sound row is kept, in order
    event(f"{len(rows)} rows kept")


def sound_line(line):
    """The row a line of the log should give (its known fields), or None."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(row, dict) or not {"step", "train_loss", "val_loss", "time"} <= set(row):
        return None
    row = {k: row[k] for k in LOG_KEYS if k in row}
    return row if sound(row) else None
