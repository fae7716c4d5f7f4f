"""Corpus preparation, the character vocabulary, and random-offset batches.

Prepared data lives in a folder laid out as nanoGPT users know it:
    train.bin, val.bin   uint16 token ids (first 90% of the text, last 10%)
    vocab.json           {"chars": [...], "source": ..., "sha256": ...}   (JSON, never pickle)
"""
import errno
import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request

import numpy as np

from . import env, paths

SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
REPO_DIR = paths.REPO_DIR  # the clone's root, in a clone (numgpt/paths.py)
DATA_DIR = paths.data_dir()  # the clone's data/, else the user cache, or $NUMGPT_DATA_DIR
SHAKESPEARE_DIR = os.path.join(DATA_DIR, "shakespeare_char")

BOM = "\ufeff"  # a UTF-8 byte-order mark, which some editors put at the start of a file


def strip_bom(text):
    """text without a leading byte-order mark (U+FEFF), which is not part of the text."""
    return text[1:] if text.startswith(BOM) else text


def _umask(status="/proc/self/status"):
    """The process's umask, read without changing it (the Umask line of /proc/self/status, Linux
    4.7 and later). Where that cannot be read it is set and restored, which for that moment is
    process-wide: 022 is set meanwhile, so a file another thread makes then is not group- or
    world-writable."""
    try:
        with open(status, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8) & 0o777
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class DataError(Exception):
    """A problem with the user's data; the message is one line saying what to do."""


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path, data):
    """Write data to path via a temporary file in the same folder and os.replace: never
    half-written. The temporary file is new (O_EXCL) and the rename replaces whatever entry has
    the name, so a symbolic link at path is replaced, and the file it points to never written."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; the usual permissions
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def download(url, dest, sha256=None, timeout=30):
    """Fetch url into dest atomically, refusing it when its sha256 differs from the expected one."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"could not download {url} ({reason}); offline, put the file at {dest} "
                        "or pass --data=PATH") from None
    if sha256 is not None and hashlib.sha256(body).hexdigest() != sha256:
        raise DataError(f"the file downloaded from {url} does not match its sha256 {sha256}; "
                        f"nothing was written to {dest}")
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    atomic_write_bytes(dest, body)
    return dest


def local_shakespeare_candidates():
    """Where an existing copy of Tiny Shakespeare is looked for before downloading it."""
    cands = [os.path.join(SHAKESPEARE_DIR, "input.txt")]
    given = env.path("NUMGPT_SHAKESPEARE")
    if given:
        cands.insert(0, given)
    if paths.IN_CLONE:  # a shared data folder beside the clone, as on the project's own machines
        cands.append(os.path.join(os.path.dirname(REPO_DIR), "shared", "data", "tinyshakespeare",
                                  "input.txt"))
    return cands


def find_or_fetch_shakespeare(url=SHAKESPEARE_URL):
    """Path of a verified Tiny Shakespeare input.txt: an existing local copy, else a download.
    A NUMGPT_SHAKESPEARE that names no file, or another text, is an error, never passed over."""
    given = env.path("NUMGPT_SHAKESPEARE")
    if given and not os.path.isfile(given):
        raise DataError(f"{given} (NUMGPT_SHAKESPEARE) is not a file; point it to a copy of Tiny "
                        "Shakespeare's input.txt, or unset it")
    for path in local_shakespeare_candidates():
        if os.path.isfile(path):
            if sha256_file(path) == SHAKESPEARE_SHA256:
                return path
            if path == given:
                raise DataError(f"{path} (NUMGPT_SHAKESPEARE) is not Tiny Shakespeare "
                                "(sha256 differs); pass it as --data=PATH to train on it anyway")
    return download(url, os.path.join(SHAKESPEARE_DIR, "input.txt"), SHAKESPEARE_SHA256)


TEXT_CHUNK = 1 << 18  # bytes of the file decoded at a time while preparing it
TEXT_BYTES_PER_CHAR = 2  # preparing holds one uint16 id per character of the text, nothing more
TEXT_BASE_BYTES = 10 << 20  # and buffers of a few chunks, whatever the size of the text


def text_prepare_bytes(n_chars):
    """Memory that preparing a text of n_chars characters takes at its peak (see prepare).
    Checked against measured peaks (resident memory above that after imports) for ASCII, all-NUL,
    ASCII with some 4-byte characters (a str of 4 bytes a character), Cyrillic and CJK text: the
    estimate came a little above each (docs/benchmarks.md, "Memory estimates against measured
    peaks")."""
    return TEXT_BASE_BYTES + TEXT_BYTES_PER_CHAR * n_chars


def check_text_file(path):
    """One-line errors for a data path that is missing, a folder, not a regular file (a device,
    a pipe or a socket could block or never end) or not readable."""
    if not os.path.exists(path):
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise DataError(f"--data {path} is a loop of symbolic links (too many levels of "
                                "symbolic links); point --data at the text file itself") from None
        raise DataError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"--data must be a text file, {path} is a folder")
    if not os.path.isfile(path):
        raise DataError(f"--data must be a regular text file, {path} is not")
    try:
        open(path, "rb").close()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _check_text_memory(path, need):
    from .resources import _gb, available_memory
    have, bound = available_memory()
    if have is not None and need > have:
        raise DataError(f"{path} needs about {_gb(need)} of memory to prepare, but only "
                        f"{_gb(have)} is available ({bound}); use a smaller text")


def _utf8_cut(data):
    """Where the last UTF-8 sequence of data starts if it may be incomplete, else len(data)."""
    i = len(data) - 1
    while i > len(data) - 4 and i > 0 and 0x80 <= data[i] < 0xC0:
        i -= 1
    return i if i >= 0 and data[i] >= 0xC0 else len(data)


def text_pieces(path):
    """The text of a UTF-8 file as str pieces of about TEXT_CHUNK bytes each, a leading BOM
    dropped, never the whole file at once; DataError where it cannot be read or is not UTF-8."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    with f:
        offset, pending, first = 0, b"", True
        while True:
            try:
                block = f.read(TEXT_CHUNK)
            except OSError as e:
                raise DataError(f"cannot read {path}: {e.strerror}") from None
            data = pending + block
            cut = _utf8_cut(data) if block else len(data)
            try:
                piece = data[:cut].decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 text (bad byte at offset "
                                f"{offset + e.start}); convert it to UTF-8 first") from None
            if first and piece:
                piece, first = strip_bom(piece), False
            if piece:
                yield piece
            offset, pending = offset + cut, data[cut:]
            if not block:
                return


def _code_points(piece):
    return np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)


class Vocab:
    """Characters <-> ids, ids in order of sorted characters (as in the video)."""

    def __init__(self, chars):
        self.chars = list(chars)
        if len(self.chars) > 65535:
            raise DataError(f"{len(self.chars)} distinct characters do not fit uint16 ids")
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    def __len__(self):
        return len(self.chars)

    def encode(self, s):
        unknown = sorted({c for c in s if c not in self.stoi})
        if unknown:
            shown = "".join(unknown[:10])
            raise DataError(f"characters not in the vocabulary: {shown!r}; use only characters "
                            "that occur in the training text")
        return self._ids(s).astype(np.int64)

    def _ids(self, s):
        """uint16 ids of a string known to be in the vocabulary, without a Python loop per char."""
        code = np.frombuffer(s.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        points = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        order = np.argsort(points)
        pos = np.searchsorted(points[order], code)
        return order[pos].astype(np.uint16)

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in ids)


def prepare(text_path, out_dir, source=None, block_size=None):
    """Encode a UTF-8 text file into out_dir/{train.bin, val.bin, vocab.json} (90% / 10%). With
    block_size, a text whose splits are too short for it is refused before anything is written.

    The file is read twice, a chunk at a time: once for its characters and their count, once
    for their ids. Only the ids (TEXT_BYTES_PER_CHAR bytes a character) are held whole, so the
    memory check is exact for any text: before reading, against the least the file's size
    allows (4 bytes a character), and after counting, against the characters there are."""
    check_text_file(text_path)
    _check_text_memory(text_path, text_prepare_bytes(os.path.getsize(text_path) // 4))
    seen = np.zeros(0x110000, dtype=bool)
    n_chars = 0
    for piece in text_pieces(text_path):
        seen[_code_points(piece)] = True
        n_chars += len(piece)
    if not n_chars:
        raise DataError(f"{text_path} is empty")
    _check_text_memory(text_path, text_prepare_bytes(n_chars))
    points = np.flatnonzero(seen)
    vocab = Vocab(chr(c) for c in points)
    table = np.zeros(0x110000, dtype=np.uint16)
    table[points] = np.arange(len(points))
    ids = np.empty(n_chars, dtype=np.uint16)
    pos = 0
    for piece in text_pieces(text_path):
        codes = _code_points(piece)
        if pos + len(codes) > n_chars or not seen[codes].all():
            break
        ids[pos:pos + len(codes)] = table[codes]
        pos += len(codes)
    if pos != n_chars:
        raise DataError(f"{text_path} changed while it was being prepared; prepare it again")
    n = int(0.9 * n_chars)
    if block_size is not None:
        check_splits(n, n_chars - n, block_size)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(out_dir, "train.bin"), memoryview(ids[:n]).cast("B"))
    atomic_write_bytes(os.path.join(out_dir, "val.bin"), memoryview(ids[n:]).cast("B"))
    meta = {"chars": vocab.chars, "source": source or os.path.abspath(text_path),
            "sha256": sha256_file(text_path), "n_train": n, "n_val": n_chars - n}
    atomic_write_bytes(os.path.join(out_dir, "vocab.json"),
                       json.dumps(meta, indent=0).encode("utf-8"))  # ASCII: any path, even undecodable
    return out_dir


def check_splits(n_train, n_val, block_size):
    """DataError unless both splits hold a sequence of block_size and its next character."""
    for name, n in (("train", n_train), ("val", n_val)):
        if n < block_size + 1:
            raise DataError(f"the {name} split has {n} characters, fewer than "
                            f"block_size + 1 = {block_size + 1}; use a longer text or a "
                            "smaller --block_size")


def prepared_dir_for(text_path):
    """Where the prepared copy of an arbitrary text file goes: DATA_DIR/<name>-<sha8>/ (the
    clone's data/, the user cache when installed, or $NUMGPT_DATA_DIR: numgpt/paths.py)."""
    stem = os.path.splitext(os.path.basename(text_path))[0] or "text"
    return os.path.join(DATA_DIR, f"{stem}-{sha256_file(text_path)[:8]}")


class Dataset:
    """The train and val splits of a prepared folder, with random-offset batches."""

    def __init__(self, folder):
        try:
            with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
                meta = json.load(f)
            self.vocab = Vocab(meta["chars"])
            self.train = np.fromfile(os.path.join(folder, "train.bin"), dtype=np.uint16)
            self.val = np.fromfile(os.path.join(folder, "val.bin"), dtype=np.uint16)
            chars = self.vocab.chars
            if not (all(isinstance(c, str) and len(c) == 1 for c in chars)
                    and len(set(chars)) == len(chars) and chars):
                raise ValueError("the vocabulary is not a list of distinct characters")
            if any(len(a) and int(a.max()) >= len(chars) for a in (self.train, self.val)):
                raise ValueError("a token id is outside the vocabulary")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"prepared data in {folder} is missing or broken ({e}); "
                            "delete the folder to prepare it again") from None
        self.folder = folder
        self.meta = meta

    def check_block(self, block_size):
        check_splits(len(self.train), len(self.val), block_size)

    def get_batch(self, split, batch_size, block_size, rng):
        """x, y: [B, T] int64, y shifted one character right of x, from random offsets."""
        data = self.train if split == "train" else self.val
        ix = rng.integers(0, len(data) - block_size, batch_size)
        x = np.stack([data[i:i + block_size] for i in ix]).astype(np.int64)
        y = np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64)
        return x, y


def load_dataset(data=None, block_size=None):
    """Prepare (if needed) and open a dataset: Tiny Shakespeare when data is None, else a text file.
    block_size: a text too short for it is refused before it is prepared (nothing written)."""
    if data is None:
        folder = SHAKESPEARE_DIR
        if not all(os.path.isfile(os.path.join(folder, f))
                   for f in ("train.bin", "val.bin", "vocab.json")):
            _prepare_into(find_or_fetch_shakespeare(), folder, SHAKESPEARE_URL, block_size)
        return Dataset(folder)
    text_path = os.path.abspath(os.fsdecode(data))
    check_text_file(text_path)  # before its sha256 is read: a device could never end
    folder = prepared_dir_for(text_path)
    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        _prepare_into(text_path, folder, None, block_size)
    return Dataset(folder)


def _prepare_into(text_path, folder, source=None, block_size=None):
    try:
        prepare(text_path, folder, source=source, block_size=block_size)
    except OSError as e:
        raise DataError(f"cannot write the prepared data to {folder} ({e.strerror}); set "
                        "NUMGPT_DATA_DIR to a writable folder") from None
