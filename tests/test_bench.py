"""bench/bench.py's workers take turns: each warms up alone, then answers "RUN k skip" with its
measurements; a worker that fails is reported as a one-line error, and the others go on."""
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("numgpt_bench", os.path.join(ROOT, "bench", "bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_an_unreadable_variable_is_one_line_before_any_worker(monkeypatch, capsys):
    bench = _bench()
    monkeypatch.setenv("NUMGPT_NO_MALLOPT", "maybe")
    monkeypatch.setattr(bench, "run_worker", lambda *a: pytest.fail("a worker was started"))
    assert bench.main(["--configs", "tiny", "--no-sample"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: NUMGPT_NO_MALLOPT='maybe' is not a switch value; use 1/true/yes/on or 0/false/no/off"]


def test_workers_take_turns_and_a_failing_one_is_reported():
    bench = _bench()
    over = dict(n_layer=1, n_head=2, n_embd=8, block_size=4, batch_size=2)
    good = {"kind": "train", "impl": "numgpt", "preset": "residual", "overrides": over, "warmup": 1}
    bad = dict(good, preset="no-such-preset")
    # the matmul peak's job takes its own turn size: one rate per round
    peak = {"kind": "peak_turns", "per_turn": 1, "skip": 0}
    # b as --numpy-first runs it: NumPy imported before numgpt (a comes first, as in train.py)
    out = bench.run_in_turns({"a": (sys.executable, good), "bad": (sys.executable, bad),
                              "b": (sys.executable, dict(good, numpy_first=True)),
                              "peak": (sys.executable, peak)},
                             threads=1, rounds=3, per_turn=2, skip=1)
    for name in ("a", "b"):
        assert len(out[name]["values"]) == 3 * 2 and all(v > 0 for v in out[name]["values"])
        assert out[name]["peak_rss_mb"] > 0
    assert out["a"]["numpy_first"] is False and out["b"]["numpy_first"] is True
    assert len(out["peak"]["values"]) == 3 and all(v > 1e8 for v in out["peak"]["values"])
    assert "error" in out["bad"] and "exited" in out["bad"]["error"]
    assert "\n" not in out["bad"]["error"]
    missing = bench.run_in_turns({"x": ("/no/such/python", good)}, 1, 1, 1, 0)
    assert "could not start" in missing["x"]["error"]
    assert bench.median([3.0, 1.0, 2.0]) == 2.0 and bench.median([4.0, 1.0, 2.0, 3.0]) == 2.5
