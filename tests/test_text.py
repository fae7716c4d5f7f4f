"""Reading and preparing text files: the memory preparing takes (measured in a fresh process
against its estimate), chunked UTF-8 decoding, byte-order marks, and the permissions of the
files written (the umask is read, never changed)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import numgpt.data as data
import numgpt.resources as res
from numgpt.data import (DataError, Dataset, atomic_write_bytes, prepare, strip_bom,
                         text_prepare_bytes)

MB = 1 << 20

WORDS = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]


def write_kind(path, kind, size):
    """About size bytes of text of one kind: ascii (1 byte a character), emoji (ASCII with a
    4-byte character every 100, so a str holds 4 bytes a character), cjk (3 bytes a character)."""
    rng = np.random.default_rng(0)
    if kind == "ascii":
        unit = " ".join(rng.choice(WORDS, 2000)) + "\n"
    elif kind == "emoji":
        words = " ".join(rng.choice(WORDS, 4000))
        unit = "".join(words[i:i + 99] + "\U0001F600" for i in range(0, len(words), 99))
    else:
        unit = "".join(chr(c) for c in rng.integers(0x4E00, 0x4E00 + 3000, 4000))
    raw = unit.encode("utf-8")
    with open(path, "wb") as f:
        f.write(raw * (size // len(raw) + 1))
    return str(path)


PEAK_SCRIPT = r"""
import sys
import numgpt.data, numgpt.resources
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
try:  # start the high-water mark afresh after the imports (Linux 4.0 and later)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = status("VmRSS")
numgpt.data.prepare(sys.argv[1], sys.argv[2])
print(status("VmHWM") - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("kind", ["ascii", "emoji", "cjk"])
def test_preparing_a_text_peaks_within_its_estimate(python, repo, tmp_path, kind):
    """The peak memory of prepare (VmHWM of a fresh process, less its RSS after imports: unlike
    ru_maxrss, which a child inherits from pytest at fork, VmHWM starts afresh at exec)
    is at most its estimate, and for the kinds that take most a byte (ASCII, and ASCII whose str
    is 4 bytes a character) not 10% below it; it was 23 to 26 bytes a byte, for 16 estimated."""
    path = write_kind(tmp_path / f"{kind}.txt", kind, 60 * MB)  # the fixed 10 MB under 10%
    out = tmp_path / "prep"
    r = subprocess.run([python, "-c", PEAK_SCRIPT, path, str(out)], capture_output=True,
                       text=True, timeout=300, cwd=repo, env=dict(os.environ, PYTHONPATH=repo))
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.split()[-1])
    n_chars = len(Dataset(str(out)).train) + len(Dataset(str(out)).val)
    estimate = text_prepare_bytes(n_chars)
    assert 2 * n_chars <= peak <= estimate, (peak, estimate)
    if kind != "cjk":  # 3 bytes a character: the fixed buffers weigh more than 10% at 60 MB
        assert peak >= estimate / 1.1, (peak, estimate)


def test_the_memory_check_counts_characters(tmp_path, monkeypatch):
    path = write_kind(tmp_path / "cjk.txt", "cjk", 1 * MB)
    n_chars = len(open(path, encoding="utf-8").read())
    need = text_prepare_bytes(n_chars)
    monkeypatch.setattr(res, "available_memory", lambda root="/": (need, "free memory"))
    prepare(path, str(tmp_path / "fits"))
    monkeypatch.setattr(res, "available_memory",
                        lambda root="/": (need - 1, "the cgroup's memory limit"))
    with pytest.raises(DataError, match=r"needs about 1\d MB of memory to prepare, but only 1\d MB "
                                        r"is available \(the cgroup's memory limit\)"):
        prepare(path, str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused")


def test_a_text_far_too_large_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "big.txt"
    path.write_bytes(b"\xff" * (4 * MB))  # not UTF-8: reading it would say so
    monkeypatch.setattr(res, "available_memory", lambda root="/": (2 * MB, "free memory"))
    least = res._gb(text_prepare_bytes(4 * MB // 4))  # were every character 4 bytes
    with pytest.raises(DataError, match=f"needs about {least} of memory to prepare"):
        prepare(str(path), str(tmp_path / "o"))


MIXED = "a\u00e9\u20ac\U0001F600b\n\ufeffz" * 50  # 1, 2, 3 and 4 bytes; a BOM inside is kept


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64, 1 << 18])
def test_chunks_split_characters_anywhere(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(data, "TEXT_CHUNK", chunk)
    path = tmp_path / "mixed.txt"
    path.write_bytes(("\ufeff" + MIXED).encode("utf-8"))
    prepare(str(path), str(tmp_path / "o"))
    ds = Dataset(str(tmp_path / "o"))
    assert ds.vocab.chars == sorted(set(MIXED))
    assert ds.vocab.decode(np.concatenate([ds.train, ds.val])) == MIXED
    assert len(ds.train) == int(0.9 * len(MIXED))


@pytest.mark.parametrize("chunk", [1, 3, 1 << 18])
@pytest.mark.parametrize("raw,offset", [
    ("\ufeffab\u20ac".encode() + b"\xff" + b"cd", 8),          # a byte no UTF-8 has
    ("ab\u20ac".encode() + b"\xe2\x82", 5),                      # cut short at the end
    (b"abc\xc3(" + b"x" * 20, 3),                                # a lead byte, no continuation
    (b"x" * 10 + b"\x80\x80\x80\x80\x80", 10),                   # continuations alone
])
def test_bad_bytes_are_reported_at_their_offset_in_the_file(tmp_path, monkeypatch, chunk, raw,
                                                            offset):
    monkeypatch.setattr(data, "TEXT_CHUNK", chunk)
    path = tmp_path / "bad.txt"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=rf"not UTF-8 text \(bad byte at offset {offset}\)"):
        prepare(str(path), str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("raw", [b"", b"\xef\xbb\xbf"])
def test_empty_text_and_a_bom_alone(tmp_path, raw):
    path = tmp_path / "e.txt"
    path.write_bytes(raw)
    with pytest.raises(DataError, match="is empty"):
        data.load_dataset(str(path))


def test_a_text_that_changes_while_it_is_prepared(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("abcabc", encoding="utf-8")
    real = data.text_pieces
    calls = []

    def pieces(p):
        calls.append(p)
        if len(calls) == 2:
            with open(p, "a", encoding="utf-8") as f:
                f.write("xyz")
        return real(p)
    monkeypatch.setattr(data, "text_pieces", pieces)
    with pytest.raises(DataError, match="changed while it was being prepared"):
        prepare(str(path), str(tmp_path / "o"))


def test_a_data_file_that_cannot_be_read(text_file, monkeypatch):
    """Its sha256 (which names the prepared folder) is read before the text: an unreadable file
    must be a one-line error there too, not a PermissionError (root can read any file, so the
    refusal is simulated)."""
    real = open

    def refuse(path, *args, **kwargs):
        if os.fspath(path) == text_file:
            raise PermissionError(13, "Permission denied", path)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(data, "open", refuse, raising=False)
    with pytest.raises(DataError, match="cannot read .*: Permission denied"):
        data.load_dataset(text_file)

# ---- byte-order marks ----

def test_strip_bom():
    assert strip_bom("\ufeffabc") == "abc"
    assert strip_bom("abc\ufeff") == "abc\ufeff"
    assert strip_bom("\ufeff\ufeffa") == "\ufeffa"  # only the mark, not the text after it
    assert strip_bom("") == ""


def test_a_leading_bom_is_not_part_of_the_training_text(text_file):
    with open(text_file, encoding="utf-8") as f:
        text = f.read()
    with open(text_file, "w", encoding="utf-8-sig") as f:  # what Notepad writes
        f.write(text)
    ds = data.load_dataset(text_file)
    assert "\ufeff" not in ds.vocab.chars
    assert ds.vocab.decode(np.concatenate([ds.train, ds.val])) == text


def test_a_prompt_file_may_start_with_a_bom(python, repo, text_file, tmp_path):
    env = dict(os.environ, PYTHONPATH=repo)
    out = str(tmp_path / "run")
    r = subprocess.run([python, "train.py", f"--data={text_file}", f"--out_dir={out}",
                        "--max_iters=2", "--eval_interval=2", "--eval_iters=2", "--n_embd=16",
                        "--n_head=2", "--n_layer=1", "--block_size=16", "--batch_size=4",
                        "--warmup_iters=1"], capture_output=True, text=True, timeout=300,
                       cwd=repo, env=env)
    assert r.returncode == 0, r.stderr
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("to be or", encoding="utf-8-sig")
    r = subprocess.run([python, "sample.py", f"--out_dir={out}", f"--start=FILE:{prompt}",
                        "--max_new_tokens=5"], capture_output=True, text=True, timeout=300,
                       cwd=repo, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("to be or") and "\ufeff" not in r.stdout


# ---- the umask ----

@pytest.mark.skipif(not os.path.exists("/proc/self/status"),
                    reason="without /proc the umask can only be read by setting it")
def test_importing_data_leaves_the_umask_alone(python, repo, tmp_path):
    """Reading the umask with os.umask means setting it, for every thread of the process."""
    script = (
        "import os, sys\n"
        "calls = []\n"
        "real = os.umask\n"
        "os.umask = lambda m: calls.append(m) or real(m)\n"
        "import numgpt.data as d\n"
        "d.atomic_write_bytes(sys.argv[1], b'x')\n"
        "print(calls)\n")
    r = subprocess.run([python, "-c", script, str(tmp_path / "f")], capture_output=True,
                       text=True, timeout=300, cwd=repo, env=dict(os.environ, PYTHONPATH=repo))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_written_files_get_the_umask_of_the_moment(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_bytes(str(tmp_path / "f"), b"x")
        assert os.stat(tmp_path / "f").st_mode & 0o777 == 0o666 & ~mask
        assert data._umask() == mask and os.umask(mask) == mask  # unchanged by reading it
    finally:
        os.umask(old)


def test_umask_read_from_status_else_set_and_restored(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nUmask:\t0027\nState:\tR\n", encoding="ascii")
    assert data._umask(str(status)) == 0o027
    current = os.umask(0o022)
    os.umask(current)
    for broken in ("Name:\tpython\n", "Umask:\tzz\n", "Umask:\n"):
        status.write_text(broken, encoding="ascii")
        assert data._umask(str(status)) == current
    assert data._umask(str(tmp_path / "missing")) == current
    assert os.umask(current) == current  # restored


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
