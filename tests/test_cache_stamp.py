"""The kernels' numba cache lives in a folder named by a hash of every kernel source, the compile
options and numba's version (kernels/_jit.py), so an update never serves stale compiled code."""
import os
import shutil
import subprocess
import sys

import numgpt.kernels._jit as jit


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
    code = "import numgpt, numgpt.kernels._jit as j; print(j.CACHE_DIR)"
    dirs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=str(seed))).stdout
            for seed in (1, 2, 3)}
    assert len(dirs) == 1


def test_typed_list_helpers_are_cached_with_the_kernels(tmp_path):
    """numba compiles the helpers behind numba.typed.List per element type and keeps them in
    memory only (1.3 s at the start of a fused-step run); kernels/_jit.py caches them with the
    kernels, so a second process loads them instead of compiling."""
    code = ("import numgpt, numgpt.kernels._jit as j, numpy as np\n"
            "from numba.typed import List, typedlist\n"
            "for shape in ((3,), (2, 3), (2, 2, 3)):\n"
            "    List([np.zeros(shape, np.float32)] * 3)\n"
            "print(j.CACHE_DIR)\n"
            "print(sum(typedlist._make_list.stats.cache_hits.values()))\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env=env).stdout.split() for _ in range(2)]
    cache_dir = runs[0][0]
    assert cache_dir.startswith(str(tmp_path))
    assert any(f.startswith("typedlist._make_list") for f in os.listdir(cache_dir))
    assert int(runs[0][1]) == 0 and int(runs[1][1]) >= 3  # compiled once, then loaded
