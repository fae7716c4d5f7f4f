"""Forged checkpoints and logs, and numbers that cannot work in float32 (issue 16): each must be
refused with one line naming the file and the problem, never a traceback, never by running code."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from ckpt_tools import (change_meta, members, npy, npy_with_header, pickle_payloads, replace_member,
                        rezip, small_checkpoint, with_meta)

import numgpt
from numgpt.checkpoint import CheckpointError, load_checkpoint, read_model_checkpoint
from numgpt.config import EPS_MIN, ConfigError, get_config
from numgpt.trainer import read_log


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(checkpoint bytes, log.jsonl path) of a real 2-step run."""
    return small_checkpoint(str(tmp_path_factory.mktemp("small")))


def write(tmp_path, blob, name="ckpt.npz"):
    p = tmp_path / name
    p.write_bytes(blob)
    return str(p)


def refused(tmp_path, blob, match):
    path = write(tmp_path, blob)
    with pytest.raises(CheckpointError, match=match) as e:
        read_model_checkpoint(path)
    msg = str(e.value)
    assert path in msg and "\n" not in msg and len(msg) < 400, msg
    return path


def sample_says(path, match):
    """sample.py on the folder of path: one line on stderr naming the problem, exit 2."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(repo, "sample.py"),
                        f"--out_dir={os.path.dirname(path)}"], capture_output=True, text=True,
                       timeout=300, cwd=repo, env=dict(os.environ, PYTHONPATH=repo))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr


# ---- the archive and its members ----

def test_meta_of_deeply_nested_json(small, tmp_path):
    blob, _ = small
    path = refused(tmp_path, with_meta(blob, "[" * 100000 + "]" * 100000),
                   "broken meta entry .RecursionError")
    sample_says(path, "broken meta entry")


def test_member_named_meta_without_npy(small, tmp_path):
    blob, _ = small
    forged = rezip([("meta" if n == "meta.npy" else n, d) for n, d in members(blob)])
    refused(tmp_path, forged, "member 'meta' is not an .npy array")
    forged = rezip([("meta", b"{}") if n == "meta.npy" else (n, d) for n, d in members(blob)])
    refused(tmp_path, forged, "member 'meta' is not an .npy array")


def test_parameter_member_that_is_not_npy(small, tmp_path):
    blob, _ = small
    refused(tmp_path, replace_member(blob, "p.tok_emb.npy", b"hello"),
            "member p.tok_emb is not a readable .npy array")


def test_npy_header_claiming_terabytes_names_the_member(small, tmp_path):
    blob, _ = small
    header = {"descr": "<f4", "fortran_order": False, "shape": (10 ** 6, 10 ** 6)}
    path = refused(tmp_path, replace_member(blob, "p.tok_emb.npy", npy_with_header(header, b"")),
                   r"member p.tok_emb claims a 1000000x1000000 float32 array \(4.0 TB\) but "
                   "holds 0 bytes")
    sample_says(path, "claims a 1000000x1000000 float32 array (4.0 TB)")


@pytest.mark.parametrize("shape,data", [((3,), b"\0" * 8), ((2,), b"\0" * 12), ((-1,), b"")])
def test_npy_header_and_data_must_agree(small, tmp_path, shape, data):
    blob, _ = small
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    refused(tmp_path, replace_member(blob, "p.tok_emb.npy", npy_with_header(header, data)),
            "member p.tok_emb")


def test_npy_header_of_nested_operators(small, tmp_path):
    """A few kB of '-' make Python's parser give up with MemoryError: not out of memory."""
    blob, _ = small
    member = b"\x93NUMPY\x01\x00" + (9000).to_bytes(2, "little") + b"-" * 8999 + b"1"
    refused(tmp_path, replace_member(blob, "p.tok_emb.npy", member), "not a readable .npy array")


def test_npy_header_with_an_unclosed_bracket(small, tmp_path):
    """NumPy parses again, with tokenize, a header that is not a Python literal, and tokenize
    raises TokenError on an unclosed bracket (hypothesis found it: test_fuzz_loaders.py)."""
    blob, _ = small
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (3, "
    header += b" " * (117 - len(header)) + b"\n"
    member = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 12
    refused(tmp_path, replace_member(blob, "p.tok_emb.npy", member), "not a readable .npy array")


def test_member_names_with_line_breaks_stay_on_one_line(small, tmp_path):
    blob, _ = small
    items = [("p.tok\nemb.npy" if n == "p.tok_emb.npy" else n, d) for n, d in members(blob)]
    bad = [(n, npy(np.array([b"ab"])) if "\n" in n else d) for n, d in items]
    refused(tmp_path, rezip(bad), "member p.tok emb has dtype")


@pytest.mark.parametrize("descr", ["|O", "|V8", "|S4", "<M8[s]", [("a", "<f4")]])
def test_members_of_other_dtypes_are_refused_before_reading(small, tmp_path, descr):
    blob, _ = small
    member = npy_with_header({"descr": descr, "fortran_order": False, "shape": (1,)}, b"\0" * 8)
    refused(tmp_path, replace_member(blob, "p.tok_emb.npy", member), "member p.tok_emb")


def test_pickles_anywhere_are_never_loaded(small, tmp_path):
    blob, _ = small
    marker = str(tmp_path / "pwned")
    raw, obj = pickle_payloads(marker)
    for name in ("meta.npy", "p.tok_emb.npy", "opt.t.npy"):
        for payload in (raw, obj):
            with pytest.raises(CheckpointError):
                read_model_checkpoint(write(tmp_path, replace_member(blob, name, payload)))
    with pytest.raises(CheckpointError, match="is a pickle"):
        load_checkpoint(write(tmp_path, raw))
    assert not os.path.exists(marker)


def test_meta_must_be_text_and_members_unique(small, tmp_path):
    blob, _ = small
    refused(tmp_path, replace_member(blob, "meta.npy", npy(np.arange(3))), "meta entry is a int64")
    items = members(blob)
    refused(tmp_path, rezip(items + [items[1]]), "holds member p.tok_emb twice")


def test_loaded_arrays_are_writable_and_fortran_order_kept(small, tmp_path):
    blob, _ = small
    a = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    params, _, _ = load_checkpoint(write(tmp_path, rezip(members(blob) + [("p.x.npy", npy(a))])))
    np.testing.assert_array_equal(params["x"], a)
    params["tok_emb"][0, 0] = 1.0


# ---- the meta fields that --resume uses ----

BROKEN_META = {
    "step true": (lambda m: m.__setitem__("step", True), "step count"),
    "step beyond int64": (lambda m: m.__setitem__("step", 2 ** 70), "step count"),
    "best_val NaN": (lambda m: m.__setitem__("best_val", math.nan), "best val loss"),
    "best_val -Infinity": (lambda m: m.__setitem__("best_val", -math.inf), "best val loss"),
    "best_val text": (lambda m: m.__setitem__("best_val", "x"), "best val loss"),
    "best_val true": (lambda m: m.__setitem__("best_val", True), "best val loss"),
    "config a list": (lambda m: m.__setitem__("config", [["n_layer", 1]]),
                      "invalid config .not a JSON object"),
    "rng_state list": (lambda m: m.__setitem__("rng_state", [1, 2]), "random-generator"),
    "rng another generator": (lambda m: m["rng_state"].__setitem__("bit_generator", "MT19937"),
                              "not PCG64"),
    "rng state text": (lambda m: m["rng_state"]["state"].__setitem__("state", "7"), "2\\*\\*128"),
    "rng state float": (lambda m: m["rng_state"]["state"].__setitem__("inc", 3.0), "2\\*\\*128"),
    "rng state bool": (lambda m: m["rng_state"]["state"].__setitem__("inc", True), "2\\*\\*128"),
    "rng state huge": (lambda m: m["rng_state"]["state"].__setitem__("state", 2 ** 128),
                       "2\\*\\*128"),
    "rng has_uint32 5": (lambda m: m["rng_state"].__setitem__("has_uint32", 5), "buffered word"),
    "rng uinteger -1": (lambda m: m["rng_state"].__setitem__("uinteger", -1), "buffered word"),
    "rng missing key": (lambda m: m["rng_state"].pop("uinteger"), "not a PCG64 state"),
    "rng deep": (lambda m: m["rng_state"].__setitem__("state", [[[[1]]]]), "2\\*\\*128"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_META))
def test_broken_meta_fields_are_refused(small, tmp_path, name):
    blob, _ = small
    change, match = BROKEN_META[name]
    refused(tmp_path, change_meta(blob, change), match)


def test_meta_without_rng_state_or_best_val_still_samples(small, tmp_path):
    blob, _ = small

    def drop(m):
        del m["rng_state"], m["best_val"]
    read_model_checkpoint(write(tmp_path, change_meta(blob, drop)))
    read_model_checkpoint(write(tmp_path, change_meta(blob, lambda m: m.__setitem__(
        "best_val", math.inf))))  # Infinity: no evaluation yet


def opt_member(blob, key, value):
    return replace_member(blob, f"opt.{key}.npy", npy(value))


def test_broken_optimizer_state_is_refused(small, tmp_path):
    blob, _ = small
    params, opt, _ = load_checkpoint(write(tmp_path, blob))
    m = next(k for k in opt if k.startswith("m."))
    v = "v." + m[2:]
    shape = opt[m].shape
    for key, value, match in [
            ("t", np.array(True), "step count t"),
            ("t", np.array(2.0), "step count t"),
            ("t", np.array([1, 2]), "step count t"),
            ("t", np.array(-3), "step count t"),
            (m, np.zeros(shape, np.int32), f"opt.{m} must be floats"),
            (m, np.zeros((1,) + shape, np.float32), f"opt.{m} must be floats"),
            (m, np.full(shape, np.inf, np.float32), "NaN or infinite"),
            (m, np.full(shape, 1e300), "NaN or infinite"),  # finite in float64, not in float32
            (v, np.full(shape, -1.0, np.float32), "negative")]:
        refused(tmp_path, opt_member(blob, key, value), match)
    refused(tmp_path, rezip([(n, d) for n, d in members(blob) if n != f"opt.{v}.npy"]),
            f"opt.{v} is missing")
    refused(tmp_path, rezip(members(blob) + [("opt.zzz.npy", npy(np.zeros(2)))]),
            "unexpected entry opt.zzz")


def test_float64_weights_beyond_float32_are_refused(small, tmp_path):
    blob, _ = small
    params, _, _ = load_checkpoint(write(tmp_path, blob))
    big = np.full(params["tok_emb"].shape, 1e300)  # finite here, inf once the model holds it
    refused(tmp_path, replace_member(blob, "p.tok_emb.npy", npy(big)), "NaN or infinite")


def test_config_number_too_large_for_a_float(small, tmp_path):
    blob, _ = small
    def huge(m):
        m["config"]["learning_rate"] = 10 ** 400
    refused(tmp_path, change_meta(blob, huge),
            "invalid config .learning_rate must be a finite number")
    with pytest.raises(ConfigError, match="learning_rate"):
        get_config("bigram", learning_rate=10 ** 400)


# ---- log.jsonl ----

GOOD_ROW = {"step": 1, "train_loss": 2.5, "val_loss": 2.6, "lr": 1e-3, "time": 0.5}


@pytest.mark.parametrize("bad", [
    '{"step": true, "train_loss": 1, "val_loss": 1, "time": 1}',
    '{"step": 2, "train_loss": NaN, "val_loss": 1, "time": 1}',
    '{"step": 2, "train_loss": 1, "val_loss": Infinity, "time": 1}',
    '{"step": 2, "train_loss": 1, "val_loss": 1, "time": -Infinity}',
    '{"step": 2, "train_loss": 1, "val_loss": 1, "time": -1}',
    '{"step": 2, "train_loss": true, "val_loss": 1, "time": 1}',
    '{"step": 2, "train_loss": 1, "val_loss": 1, "time": 1, "lr": NaN}',
    '{"step": 2, "train_loss": 1, "val_loss": 1, "time": 1, "lr": "x"}',
    '{"step": -1, "train_loss": 1, "val_loss": 1, "time": 1}',
    '{"step": 2.0, "train_loss": 1, "val_loss": 1, "time": 1}',
    '{"step": 1' + "0" * 5000 + ', "train_loss": 1, "val_loss": 1, "time": 1}',
    '[' * 100000 + ']' * 100000,
    '{"a": ' * 100000 + '1' + '}' * 100000,
    '"just a string"',
])
def test_read_log_skips_rows_that_are_not_sound(tmp_path, bad):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps(GOOD_ROW) + "\n" + bad + "\n" + json.dumps(dict(GOOD_ROW, step=3))
                   + "\n", encoding="utf-8")
    assert read_log(str(log)) == [GOOD_ROW, dict(GOOD_ROW, step=3)]


def test_read_log_keeps_only_the_known_fields(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps(dict(GOOD_ROW, evil=[[[1]]])) + "\n", encoding="utf-8")
    assert read_log(str(log)) == [GOOD_ROW]


def test_resume_over_a_deeply_nested_log_line(tmp_path):
    from numgpt.data import load_dataset
    from numgpt.trainer import train
    blob, log = small_checkpoint(str(tmp_path))
    out = os.path.dirname(log)
    with open(log, "a", encoding="utf-8") as f:
        f.write("[" * 100000 + "]" * 100000 + "\n")
        f.write('{"step": 1, "train_loss": NaN, "val_loss": 1, "time": 1}\n')
    cfg = load_checkpoint(os.path.join(out, "ckpt.npz"))[2]["config"]
    cfg = get_config("laptop", **dict(cfg, max_iters=4))
    train(cfg, load_dataset(str(tmp_path / "corpus.txt")), out, resume=True, quiet=True,
          sample_chars=0)
    rows = read_log(log)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(math.isfinite(r["train_loss"]) for r in rows)


# ---- float settings that cannot work in float32 ----

@pytest.mark.parametrize("over,match", [
    (dict(eps="1e-50"), "eps must be in"),
    (dict(eps="1e-39"), "eps must be in"),
    (dict(eps="0"), "eps must be in"),
    (dict(eps="nan"), "eps must be a finite number"),
    (dict(weight_decay="1e308"), "weight_decay must be in"),
    (dict(weight_decay="500", learning_rate="2e-3"), "weight_decay must be in"),
    (dict(weight_decay="inf"), "weight_decay must be a finite number"),
    (dict(weight_decay="-0.1"), "weight_decay must be in"),
    (dict(beta2="0.99999999"), "beta1 and beta2"),
    (dict(beta1="1"), "beta1 and beta2"),
    (dict(beta1="nan"), "beta1 must be a finite number"),
    (dict(min_lr="nan"), "min_lr must be a finite number"),
    (dict(grad_clip="nan"), "grad_clip must be a finite number"),
    (dict(dropout="nan"), "dropout must be a finite number"),
    (dict(init_std="inf"), "init_std must be a finite number"),
    (dict(ffn_mult="nan", model="bigram"), "ffn_mult must be a finite number"),
])
def test_float_settings_must_hold_in_float32(over, match):
    with pytest.raises(ConfigError, match=match):
        get_config("laptop", **over)


def test_a_beta_beyond_float32_is_refused_without_a_warning():
    """1e300 overflowed in the float32 cast of the check, a RuntimeWarning on stderr before the
    one-line error (found by the fuzz test of the checkpoint loader)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ConfigError, match="beta1 and beta2"):
            get_config("laptop", beta2=1e300)


def test_float_settings_at_their_limits_are_accepted():
    cfg = get_config("laptop", eps=EPS_MIN, weight_decay=499.0, learning_rate=2e-3,
                     beta1=0.99999994, beta2=0.0)
    assert cfg.eps == EPS_MIN and cfg.weight_decay == 499.0


def test_why_eps_needs_a_floor():
    """eps below float32's range adds nothing: a parameter without gradient gets 0 / 0 = NaN."""
    from numgpt.optim import AdamW
    for eps, finite in ((1e-50, False), (EPS_MIN, True)):
        p = {"w": np.ones((2, 2), np.float32)}
        opt = AdamW(p, lr=1e-3, eps=eps, weight_decay=0.0)
        with np.errstate(invalid="ignore"):
            opt.step({"w": np.zeros((2, 2), np.float32)})
        assert np.isfinite(p["w"]).all() == finite, eps


@pytest.mark.parametrize("args,match", [(["--eps=1e-50"], "eps must be in"),
                                        (["--weight_decay=1e308"], "weight_decay must be in")])
def test_train_refuses_floats_that_break_float32(tmp_path, args, match):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(repo, "train.py"), f"--out_dir={tmp_path}/o",
                        "--data=/nonexistent", *args], capture_output=True, text=True,
                       timeout=300, cwd=repo, env=dict(os.environ, PYTHONPATH=repo))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and match in lines[0], r.stderr


# ---- set_params ----

@pytest.mark.parametrize("value,match", [
    (np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"), (-np.inf, "NaN or infinite"),
    (1e300, "NaN or infinite values .in float32"), (1 + 2j, "real numbers"), (True, "real numbers"),
    ("x", "real numbers"), (None, "real numbers")])
def test_set_params_refuses_values_a_model_cannot_hold(value, match):
    model = numgpt.GPT(get_config("bigram", vocab_size=5))
    before = model.get_params()
    params = model.get_params()
    params["tok_emb"] = np.full((5, 5), value, dtype=object if value is None else None)
    with pytest.raises(ValueError, match="parameter tok_emb .*" + match):
        model.set_params(params)
    with pytest.raises(ValueError, match="parameter tok_emb"):
        numgpt.GPT(get_config("bigram", vocab_size=5), params=params)
    np.testing.assert_array_equal(model.params["tok_emb"], before["tok_emb"])  # untouched
    params["tok_emb"] = np.arange(25).reshape(5, 5)  # whole numbers are real numbers
    model.set_params(params)
    assert model.params["tok_emb"].dtype == np.float32


def test_a_config_asking_for_an_astronomical_model_is_one_short_line(small, tmp_path):
    """A forged n_layer hundreds of digits long (found by the loader fuzz): the error says how
    many parameters the config needs without printing all of their digits."""
    blob, _ = small

    def huge(meta):
        meta["config"]["n_layer"] = 10 ** 400
    path = refused(tmp_path, change_meta(blob, huge), r"but its config needs over 10\^40[0-9]")
    sample_says(path, "parameter values")
