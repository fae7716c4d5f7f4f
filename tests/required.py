"""Whether a test whose optional part is missing (PyTorch, mpi4py, a wheel build) may skip: not
where NUMGPT_TEST_REQUIRE_BUILD or CI holds a true value (1/true/yes/on in any case, the rule of
numgpt/env.py). .ci/run sets NUMGPT_TEST_REQUIRE_BUILD, so there a missing part fails its tests."""
import os

from numgpt.env import TRUE

VARIABLES = ("NUMGPT_TEST_REQUIRE_BUILD", "CI")


def may_not_skip():
    return any(os.environ.get(v, "").strip().lower() in TRUE for v in VARIABLES)
