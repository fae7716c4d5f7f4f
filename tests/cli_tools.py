"""Helpers for tests that run train.py or sample.py in a subprocess."""


def one_line_error(r, match):
    """r (a finished subprocess.run) failed with exactly one line 'error: ...' containing match on
    stderr, and no traceback."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: ") and match in lines[-1], r.stderr
    assert sum(ln.startswith("error: ") for ln in lines) == 1 and len(lines[-1]) < 400
