"""Every environment variable numgpt reads, parsed here with one rule.

Switches take 1/true/yes/on or 0/false/no/off in any case (surrounding spaces ignored); unset or
empty means the default. Any other value is an error (one line naming the variable), never a
silent guess. Paths are used as given; unset or empty means the default.

    NUMGPT_FUSED            switch, default on: the fused training step of small models
    NUMGPT_DATA_PARALLEL    switch, default on: the two-thread step of mid-sized models
    NUMGPT_NO_MEMORY_CHECK  switch, default off: skip the memory check before a run
    NUMGPT_NO_MALLOPT       switch, default off: leave glibc's malloc settings alone
    NUMGPT_STEP             one of fused_lanes, fused, sharded, one_blas, plain: force that step
    NUMGPT_DATA_DIR         path: where prepared data sets go (default: numgpt/paths.py)
    NUMGPT_SHAKESPEARE      path: an existing copy of Tiny Shakespeare's input.txt
    NUMBA_CACHE_DIR         path (numba's own): where compiled kernels are cached
    XDG_CACHE_HOME          path (the XDG standard's): the per-user cache of an installed numgpt
"""
import os

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")

SWITCHES = {"NUMGPT_FUSED": True, "NUMGPT_DATA_PARALLEL": True,
            "NUMGPT_NO_MEMORY_CHECK": False, "NUMGPT_NO_MALLOPT": False}
CHOICES = {"NUMGPT_STEP": ("fused_lanes", "fused", "sharded", "one_blas", "plain")}
PATHS = ("NUMGPT_DATA_DIR", "NUMGPT_SHAKESPEARE", "NUMBA_CACHE_DIR", "XDG_CACHE_HOME")


class EnvError(ValueError):
    """An environment variable holds a value numgpt cannot read; the message is one line."""


def switch(name):
    """The boolean value of the switch `name` (one of SWITCHES), its default when unset or empty."""
    default = SWITCHES[name]
    raw = os.environ.get(name, "")
    v = raw.strip().lower()
    if not v:
        return default
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise EnvError(f"{name}={raw!r} is not a switch value; use 1/true/yes/on or 0/false/no/off")


def choice(name):
    """The value of the variable `name` (one of CHOICES), lower case, or None when unset or empty."""
    raw = os.environ.get(name, "")
    v = raw.strip().lower()
    if not v:
        return None
    if v not in CHOICES[name]:
        raise EnvError(f"{name}={raw!r} is not one of {', '.join(CHOICES[name])}")
    return v


def check_all():
    """Raise EnvError for the first variable that holds an unreadable value (the commands call this
    first, so a typo is one line at the start, not a traceback or a silent default later)."""
    for name in SWITCHES:
        switch(name)
    for name in CHOICES:
        choice(name)


def path(name):
    """The path in `name` (one of PATHS), or None when unset or empty."""
    assert name in PATHS, name
    return os.environ.get(name) or None
