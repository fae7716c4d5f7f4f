"""Environment switches: one parse rule for all (numgpt/env.py), and a bad value is one line."""
import subprocess
import sys

import pytest

from numgpt import env


@pytest.mark.parametrize("name", sorted(env.SWITCHES))
@pytest.mark.parametrize("raw,want", [("1", True), ("TRUE", True), (" yes ", True), ("On", True),
                                      ("0", False), ("False", False), ("NO", False), ("off", False)])
def test_every_switch_reads_every_spelling(monkeypatch, name, raw, want):
    monkeypatch.setenv(name, raw)
    assert env.switch(name) is want


@pytest.mark.parametrize("name", sorted(env.SWITCHES))
def test_unset_or_empty_is_the_default(monkeypatch, name):
    monkeypatch.delenv(name, raising=False)
    assert env.switch(name) is env.SWITCHES[name]
    monkeypatch.setenv(name, "  ")
    assert env.switch(name) is env.SWITCHES[name]


def test_no_memory_check_0_keeps_the_check(monkeypatch):
    """NUMGPT_NO_MEMORY_CHECK=0 once turned the check off (any non-empty value did)."""
    from numgpt import get_config
    from numgpt.config import ConfigError
    from numgpt.resources import check_memory
    cfg = get_config("laptop", vocab_size=65)
    monkeypatch.setenv("NUMGPT_NO_MEMORY_CHECK", "0")
    with pytest.raises(ConfigError):
        check_memory(cfg, "train", available=1)
    monkeypatch.setenv("NUMGPT_NO_MEMORY_CHECK", "TRUE")
    check_memory(cfg, "train", available=1)


def test_fused_upper_case_false_turns_it_off(monkeypatch):
    """NUMGPT_FUSED=FALSE was ignored (only lower case was read)."""
    from numgpt import get_config
    from numgpt.parallel import candidates
    cfg = get_config("laptop", vocab_size=65)
    monkeypatch.delenv("NUMGPT_FUSED", raising=False)
    monkeypatch.delenv("NUMGPT_STEP", raising=False)
    assert "fused" in candidates(cfg)
    monkeypatch.setenv("NUMGPT_FUSED", "FALSE")
    assert "fused" not in candidates(cfg) and "fused_lanes" not in candidates(
        cfg.replace(block_size=8))


def test_step_choice_is_checked(monkeypatch):
    monkeypatch.setenv("NUMGPT_STEP", " Plain ")
    assert env.choice("NUMGPT_STEP") == "plain"
    monkeypatch.setenv("NUMGPT_STEP", "fastest")
    with pytest.raises(env.EnvError,
                       match="NUMGPT_STEP='fastest' is not one of fused_lanes, fused, sharded"):
        env.check_all()


def test_an_unreadable_malloc_switch_stops_the_api_too(monkeypatch):
    """NUMGPT_NO_MALLOPT=maybe was read as on (malloc left alone) without a word in the Python
    API; now it is the one-line EnvError every switch gives, at every start of training."""
    from numgpt import _threads
    monkeypatch.setenv("NUMGPT_NO_MALLOPT", "maybe")
    monkeypatch.setattr(_threads, "_TRAINING", False)
    for _ in range(2):
        with pytest.raises(env.EnvError, match="NUMGPT_NO_MALLOPT='maybe' is not a switch value"):
            _threads.training_starts()
    assert _threads._TRAINING is False


def test_the_commands_leave_the_suites_switch_to_the_suite(monkeypatch):
    monkeypatch.setenv("NUMGPT_TEST_REQUIRE_BUILD", "y")
    env.check_all()  # train.py, sample.py and the ladder run
    with pytest.raises(env.EnvError):
        env.switch("NUMGPT_TEST_REQUIRE_BUILD")


def test_the_suites_require_build_switch_takes_the_one_rule(monkeypatch):
    """NUMGPT_TEST_REQUIRE_BUILD=y once counted as off without a word, so the torch, MPI and wheel
    tests could skip in a run that asked them not to; CI is a CI service's variable (any value
    other than a true one counts as unset)."""
    import os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from required import may_not_skip
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("NUMGPT_TEST_REQUIRE_BUILD", "y")
    with pytest.raises(env.EnvError, match="NUMGPT_TEST_REQUIRE_BUILD='y' is not a switch"):
        may_not_skip()
    monkeypatch.setenv("NUMGPT_TEST_REQUIRE_BUILD", "On")
    assert may_not_skip()
    monkeypatch.setenv("NUMGPT_TEST_REQUIRE_BUILD", "0")
    monkeypatch.setenv("CI", "woodpecker")
    assert not may_not_skip()
    monkeypatch.setenv("CI", "True")
    assert may_not_skip()


@pytest.mark.parametrize("command", [["train.py", "--out_dir"], ["sample.py", "--out_dir"],
                                     ["-m", "numgpt.ladder", "--stages=bigram", "--out-dir"]])
def test_a_bad_switch_value_is_one_line(tmp_path, command):
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    *run, out = command
    if run[0].endswith(".py"):
        run = [os.path.join(root, run[0])]
    r = subprocess.run([sys.executable, *run, out, str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=tmp_path,
                       env=dict(os.environ, NUMGPT_FUSED="maybe"), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: NUMGPT_FUSED='maybe' is not a switch value; use 1/true/yes/on or 0/false/no/off"]
    assert not (tmp_path / "out").exists()  # said before anything starts


def test_thread_counts_are_read_in_one_place(monkeypatch):
    """numgpt uses no more threads than the smallest count set in the libraries' own variables;
    values that are not whole numbers >= 1 are left to their library (not counted)."""
    from numgpt.parallel import cores
    for var in env.THREAD_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    assert env.thread_cap() is None
    every = cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("MKL_NUM_THREADS", " 1 ")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "0")
    monkeypatch.setenv("NUMBA_NUM_THREADS", "two")
    assert [env.threads(v) for v in env.THREAD_VARIABLES] == [None, 3, None, 1]
    assert env.thread_cap() == 1 and cores() == 1
    monkeypatch.delenv("MKL_NUM_THREADS")
    assert env.thread_cap() == 3 and cores() == min(every, 3)


def _readme_table_variables():
    """The variables named in the first column of README.md's Environment variables table."""
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        section = f.read().split("\n## Environment variables\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    names = set()
    for cell in rows:
        for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", cell):
            names.add(name)
        # `OMPI_COMM_WORLD_RANK`/`_SIZE`: a suffix names the variable with the prefix's stem
        for stem, suffix in re.findall(r"`([A-Z][A-Z0-9_]*_)[A-Z0-9]+`/`(_[A-Z0-9]+)`", cell):
            names.add(stem + suffix[1:])
    return names


def test_the_readme_table_lists_every_variable_numgpt_reads():
    """Every variable env.py reads (the one place numgpt reads any) and the test suite's own are in
    README's table, and the table names nothing else."""
    import os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from required import VARIABLES as TESTS
    read = (set(env.SWITCHES) | set(env.CHOICES) | set(env.SPIN_VARIABLES)
            | set(env.THREAD_VARIABLES) | set(env.PATHS) | set(env.SECONDS) | set(TESTS)
            | {v for pair in env.LAUNCH_VARIABLES for v in pair if v})
    listed = _readme_table_variables()
    assert read - listed == set(), "read but not in README's table"
    assert listed - read == set(), "in README's table but not read"


@pytest.mark.parametrize("name,raw", [("NUMBA_NUM_THREADS", "0"), ("NUMBA_NUM_THREADS", "-1"),
                                      ("NUMBA_NUM_THREADS", "abc"), ("OMP_NUM_THREADS", "2,x"),
                                      ("OPENBLAS_NUM_THREADS", "\u00b2")])
def test_a_bad_thread_count_is_one_line(tmp_path, name, raw):
    """numba's own check of NUMBA_NUM_THREADS=0 was a traceback on import (and 'abc' a warning
    with one in it); every thread count is now read by env.py's rule before anything starts."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "train.py"), "--preset=bigram",
                        "--max_iters=1", f"--out_dir={tmp_path / 'out'}"],
                       capture_output=True, text=True, cwd=tmp_path,
                       env=dict(os.environ, **{name: raw}), timeout=120)
    assert r.returncode == 2, r.stderr
    listed = ' (or a list of them, "4,2")' if name == "OMP_NUM_THREADS" else ""
    assert r.stderr.strip().splitlines() == [
        f"error: {name}={raw!r} is not a thread count; use a whole number >= 1{listed}, or unset it"]
    assert not (tmp_path / "out").exists()


def test_omp_num_threads_takes_a_list(monkeypatch):
    for var in env.THREAD_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2, 1")
    assert env.threads("OMP_NUM_THREADS") == 2
    env.check_all()
    monkeypatch.setenv("OMP_NUM_THREADS", "2,0")
    assert env.threads("OMP_NUM_THREADS") is None
