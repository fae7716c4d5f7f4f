"""Where numgpt keeps its files: in a clone, or installed as a package.

In a clone (numgpt's parent folder is the source tree: its setup.cfg or pyproject.toml names
numgpt and the kernels/ folder is there; an editable install counts as a clone):
    prepared data      <clone>/data/
    compiled kernels   <clone>/kernels/__pycache__/numba-<hash of the kernel sources>/
Installed (pip install of the folder or a wheel, not editable), nothing is written inside
site-packages; both go to the per-user cache folder $XDG_CACHE_HOME/numgpt (~/.cache/numgpt
when XDG_CACHE_HOME is unset or not an absolute path):
    prepared data      ~/.cache/numgpt/data/
    compiled kernels   ~/.cache/numgpt/kernels/numba-<hash>/
NUMGPT_DATA_DIR and NUMBA_CACHE_DIR override these (kernels in $NUMBA_CACHE_DIR/numba-<hash>);
out_dir is relative to the working folder in both cases.

The kernels are the package numgpt.kernels. Installed, setuptools puts the clone's top-level
kernels/ folder at numgpt/kernels (setup.cfg, package_dir); in a clone, find_kernels_in_clone()
below makes the name numgpt.kernels find that folder.
"""
import importlib.util
import os
import re
import sys

from . import env

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(PACKAGE_DIR)  # the clone's root, when numgpt runs from a clone

_NAMED_NUMGPT = re.compile(r"""^\s*name\s*=\s*["']?numgpt["']?\s*$""", re.MULTILINE)


def is_clone(root):
    """Whether root is numgpt's source tree (not site-packages, where another distribution may
    own a top-level kernels/ folder but nothing declares the project numgpt)."""
    if not os.path.isfile(os.path.join(root, "kernels", "_jit.py")):
        return False
    for meta in ("setup.cfg", "pyproject.toml"):
        try:
            with open(os.path.join(root, meta), encoding="utf-8") as f:
                if _NAMED_NUMGPT.search(f.read()):
                    return True
        except (OSError, UnicodeDecodeError):
            pass
    return False


IN_CLONE = is_clone(REPO_DIR)


def user_cache_dir():
    """$XDG_CACHE_HOME/numgpt, or ~/.cache/numgpt (the XDG rule: a relative value is ignored)."""
    base = env.path("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "numgpt")


def data_dir():
    """Where prepared data sets go: $NUMGPT_DATA_DIR, the clone's data/, or the user cache."""
    given = env.path("NUMGPT_DATA_DIR")
    if given:
        return given
    return os.path.join(REPO_DIR, "data") if IN_CLONE else os.path.join(user_cache_dir(), "data")


def kernel_cache_base(kernels_dir):
    """The folder holding the kernels' numba-<hash> caches: $NUMBA_CACHE_DIR, the clone's
    kernels/__pycache__, or the user cache (kernels_dir: the folder of numgpt.kernels)."""
    given = env.path("NUMBA_CACHE_DIR")
    if given:
        return given
    if IN_CLONE and os.path.abspath(kernels_dir) == os.path.join(REPO_DIR, "kernels"):
        return os.path.join(kernels_dir, "__pycache__")
    return os.path.join(user_cache_dir(), "kernels")


class _CloneKernels:
    """Finds numgpt.kernels in a clone: the clone's top-level kernels/ folder."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != __package__ + ".kernels":
            return None
        folder = os.path.join(REPO_DIR, "kernels")
        return importlib.util.spec_from_file_location(
            name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


def find_kernels_in_clone():
    """In a clone (also without any install, numgpt imported from the working folder) the kernels
    are <clone>/kernels, not numgpt/kernels: let the import system find them as numgpt.kernels."""
    if (IN_CLONE and not os.path.isdir(os.path.join(PACKAGE_DIR, "kernels"))
            and _CloneKernels not in sys.meta_path):
        sys.meta_path.insert(0, _CloneKernels)
