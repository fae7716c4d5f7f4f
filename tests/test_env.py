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
