"""The kernels' numba cache lives in a folder named by a hash of every kernel source, the compile
options and numba's version (kernels/_jit.py), so an update never serves stale compiled code."""
import os
import shutil
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize("attr", ["DROPOUT_REFERENCE", "ARCH_DESCRIPTION", "LAYERNORM_REFERENCE"])
def test_cache_folder_follows_the_files_outside_kernels_it_compiles_in(tmp_path, monkeypatch, attr):
    """The kernels compile in numgpt/layers/dropout.py's constants (the hash), numgpt/arch.py's
    block (block_forward, block_backward) and structure flags, and numgpt/layers/layernorm.py's
    EPS: a change to any of them names another cache folder."""
    ref = tmp_path / "copy.py"
    shutil.copy(getattr(jit, attr), ref)
    monkeypatch.setattr(jit, attr, str(ref))
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


def test_the_decoder_counts_as_cached_only_when_all_of_it_is():
    """kernels.decode_cache_is_warm (whether sampling will say it compiles) checks every compiled
    function of kernels/decode.py, found in the module (a hand-kept list fell behind the decoder),
    and after a sample they are all in the cache."""
    import glob

    from numgpt import kernels
    from numgpt.kernels import decode
    names = kernels.decode_names()
    assert {"decode_step", "sample_rows", "_mv", "_add_rows_threads", "_attend_heads_threads",
            "_feedforward_forward"} <= set(names)
    assert "_layernorm_rows" not in names  # kernels/layernorm.py's, cached as its own
    assert all(getattr(decode, n).py_func.__module__ == decode.__name__ for n in names)
    if not jit.OPTIONS["cache"]:
        return  # nothing is cached where the cache folder cannot be written
    kernels.warmup_decode()
    assert kernels.decode_cache_is_warm()
    for n in names:
        assert glob.glob(os.path.join(jit.CACHE_DIR, f"decode.{n}-*.nbi")), n
