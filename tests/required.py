"""Whether a test whose optional part is missing (PyTorch, mpi4py, a wheel build) may skip: not
where the switch NUMGPT_TEST_REQUIRE_BUILD is on (read by numgpt/env.py's rule; a value it cannot
read stops the suite before it collects anything, with the one-line error: conftest.py) or where
a CI service has set CI to a true value (numgpt/env.py's service_flag: 1/true/yes/on in any
case; CI is the service's variable, so any other value counts as unset). .ci/run sets
NUMGPT_TEST_REQUIRE_BUILD, so there a missing part fails its tests."""
from numgpt.env import service_flag, switch

VARIABLES = ("NUMGPT_TEST_REQUIRE_BUILD", "CI")  # the suite's own (README's table lists them)


def may_not_skip():
    return switch("NUMGPT_TEST_REQUIRE_BUILD") or service_flag("CI")
