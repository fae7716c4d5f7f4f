"""The kernels' numba cache lives in a folder named by a hash of every kernel source, the compile
options and numba's version (kernels/_jit.py), so an update never serves stale compiled code."""
import os
import shutil
import subprocess
import sys

import kernels._jit as jit


def test_cache_folder_is_named_by_the_kernel_sources(tmp_path, monkeypatch):
    for f in os.listdir(jit.HERE):
        if f.endswith(".py"):
            shutil.copy(os.path.join(jit.HERE, f), tmp_path / f)
    monkeypatch.setattr(jit, "HERE", str(tmp_path))
    same = jit._stamp()
    assert os.path.basename(jit.CACHE_DIR) == "numba-" + same  # the copy hashes as the original
    with open(tmp_path / "activations.py", "a") as f:
        f.write("\n# a change in a file that other kernels call into\n")
    assert jit._stamp() != same
    monkeypatch.setitem(jit.OPTIONS, "error_model", "python")
    assert len({jit._stamp(), same}) == 2


def test_cache_folder_follows_the_dropout_reference(tmp_path, monkeypatch):
    """kernels/dropout.py compiles in the hash constants of numgpt/layers/dropout.py."""
    ref = tmp_path / "dropout.py"
    shutil.copy(jit.DROPOUT_REFERENCE, ref)
    monkeypatch.setattr(jit, "DROPOUT_REFERENCE", str(ref))
    same = jit._stamp()
    assert os.path.basename(jit.CACHE_DIR) == "numba-" + same
    with open(ref, "a") as f:
        f.write("\n# new constants\n")
    assert jit._stamp() != same


def test_cache_folder_is_the_same_in_every_process():
    """(Python salts str hashes per process: a set's order must not reach the stamp.)"""
    code = "import numgpt, kernels._jit as j; print(j.CACHE_DIR)"
    dirs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=str(seed))).stdout
            for seed in (1, 2, 3)}
    assert len(dirs) == 1
