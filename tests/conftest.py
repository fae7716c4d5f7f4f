import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    """The suite's own switch read once, before anything is collected (tests/required.py): a value
    that is not a switch stops the run with env.py's one-line error."""
    from numgpt.env import EnvError, switch
    try:
        switch("NUMGPT_TEST_REQUIRE_BUILD")
    except EnvError as e:
        raise pytest.UsageError(str(e)) from None


@pytest.fixture(autouse=True)
def _data_cache(tmp_path, monkeypatch):
    """Prepared copies of test corpora go to a temp folder, not into the repo's data/."""
    cache = str(tmp_path / "data-cache")
    monkeypatch.setenv("NUMGPT_DATA_DIR", cache)
    import numgpt.data as d
    monkeypatch.setattr(d, "DATA_DIR", cache)


def write_corpus(folder):
    """A small UTF-8 corpus (with a non-ASCII character) written to folder/corpus.txt: its path."""
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis",
             "nobler", "in", "mind", "suffer", "é"]
    lines = [" ".join(rng.choice(words, 8)) for _ in range(400)]
    p = folder / "corpus.txt"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(p)


@pytest.fixture
def text_file(tmp_path):
    """A small UTF-8 corpus (with a non-ASCII character) written to a temp file."""
    return write_corpus(tmp_path)


@pytest.fixture
def repo():
    return REPO


@pytest.fixture
def python():
    return sys.executable
