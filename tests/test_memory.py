"""What memory a run may use: the machine's free memory and the limits of the process's cgroups
(v1 and v2, read from fake /proc and /sys trees), and what preparing a text really takes."""
import os
import subprocess
import sys

import numpy as np
import pytest

import numgpt.resources as res
from numgpt.checkpoint import CheckpointError, load_checkpoint
from numgpt.config import ConfigError, get_config
from numgpt.resources import available_bytes, available_memory, check_memory, training_bytes

MB = 1 << 20
GB = 1 << 30
CGROUP = "the cgroup's memory limit"
MACHINE = "free memory"


def tree(tmp_path, files, meminfo=(8 * GB, 0)):
    """A fake root: /proc/meminfo (MemAvailable, SwapFree) and the given {path: text} files."""
    root = tmp_path / "root"
    if meminfo is not None:
        avail, swap = meminfo
        files = {"proc/meminfo": f"MemTotal: 16000000 kB\nMemAvailable: {avail // 1024} kB\n"
                                 f"SwapFree: {swap // 1024} kB\n", **files}
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return str(root)


def v2(path, **levels):
    """Files of a cgroup v2 process in cgroup `path`; levels: {folder: (max, current, inactive)}."""
    files = {"proc/self/cgroup": f"0::{path}\n"}
    for folder, (limit, current, inactive) in levels.items():
        base = f"sys/fs/cgroup/{folder.strip('/')}".rstrip("/")
        files[f"{base}/memory.max"] = f"{limit}\n"
        files[f"{base}/memory.current"] = f"{current}\n"
        files[f"{base}/memory.stat"] = f"anon 1\nactive_file 7\ninactive_file {inactive}\n"
    return files


def test_cgroup_v2_limit_bounds_the_machine(tmp_path):
    root = tree(tmp_path, v2("/job", job=(500 * MB, 100 * MB, 20 * MB)))
    # 500 MB limit, 100 MB used of which 20 MB is inactive file cache the kernel can drop
    assert available_memory(root) == (420 * MB, CGROUP)
    assert available_bytes(root) == 420 * MB


def test_cgroup_v2_without_a_limit_leaves_the_machine(tmp_path):
    root = tree(tmp_path, v2("/a/b", **{"a/b": ("max", 100 * MB, 0), "a": ("max", 5 * GB, 0)}),
                meminfo=(3 * GB, 1 * GB))
    assert available_memory(root) == (4 * GB, MACHINE)


def test_cgroup_v2_parent_limit_applies_to_children(tmp_path):
    root = tree(tmp_path, v2("/slurm/uid/job/step", **{
        "slurm/uid/job/step": ("max", 200 * MB, 0),
        "slurm/uid/job": (1000 * MB, 900 * MB, 0),  # the job's limit, nearly used by other steps
        "slurm/uid": (4 * GB, 900 * MB, 0),
        "slurm": ("max", 2 * GB, 0)}))
    assert available_memory(root) == (100 * MB, CGROUP)


def test_machine_tighter_than_the_cgroup_is_named(tmp_path):
    root = tree(tmp_path, v2("/job", job=(8 * GB, 0, 0)), meminfo=(1 * GB, 0))
    assert available_memory(root) == (1 * GB, MACHINE)


def test_swap_is_not_counted_under_a_cgroup_limit(tmp_path):
    root = tree(tmp_path, v2("/job", job=(500 * MB, 0, 0)), meminfo=(100 * MB, 4 * GB))
    assert available_memory(root) == (500 * MB, CGROUP)


def test_cgroup_v1_memory_controller(tmp_path):
    base = "sys/fs/cgroup/memory"
    root = tree(tmp_path, {
        "proc/self/cgroup": "12:pids:/user\n5:cpu,cpuacct:/x\n4:memory:/docker/abc\n0::/\n",
        f"{base}/docker/abc/memory.limit_in_bytes": f"{600 * MB}\n",
        f"{base}/docker/abc/memory.usage_in_bytes": f"{250 * MB}\n",
        f"{base}/docker/abc/memory.stat": f"inactive_file 1\ntotal_inactive_file {50 * MB}\n",
        f"{base}/docker/memory.limit_in_bytes": "9223372036854771712\n",  # v1's "no limit"
        f"{base}/docker/memory.usage_in_bytes": f"{3 * GB}\n",
        f"{base}/memory.limit_in_bytes": "9223372036854771712\n"})
    assert available_memory(root) == (400 * MB, CGROUP)


def test_cgroup_v1_without_a_limit(tmp_path):
    base = "sys/fs/cgroup/memory"
    root = tree(tmp_path, {"proc/self/cgroup": "4:memory:/a\n",
                           f"{base}/a/memory.limit_in_bytes": "9223372036854771712\n",
                           f"{base}/a/memory.usage_in_bytes": "123\n"}, meminfo=(2 * GB, 0))
    assert available_memory(root) == (2 * GB, MACHINE)


def test_cgroup_found_through_mountinfo(tmp_path):
    """Docker without a cgroup namespace: /proc/self/cgroup names /docker/abc, and that cgroup
    is what is mounted at /sys/fs/cgroup/memory; cgroup v2 mounted elsewhere (hybrid layout)."""
    root = tree(tmp_path, {
        "proc/self/cgroup": "4:memory:/docker/abc\n0::/docker/abc\n",
        "proc/self/mountinfo":
            "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
            "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw,relatime master:9 - cgroup cgroup "
            "rw,memory\n"
            "41 31 0:38 / /sys/fs/cgroup/uni\\040fied rw,relatime - cgroup2 cgroup2 rw\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{700 * MB}\n",
        "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{100 * MB}\n",
        "sys/fs/cgroup/uni fied/docker/abc/memory.max": f"{300 * MB}\n",
        "sys/fs/cgroup/uni fied/docker/abc/memory.current": "0\n"})
    assert available_memory(root) == (300 * MB, CGROUP)


@pytest.mark.parametrize("limit,current,want", [
    ("lots", "0", (8 * GB, MACHINE)),                  # a limit that is not a number: none
    ("", "0", (8 * GB, MACHINE)),
    ("-5", "0", (8 * GB, MACHINE)),
    ("\u0662\u0660", "0", (8 * GB, MACHINE)),           # digits, but not ASCII ones
    (str(300 * MB), "??", (300 * MB, CGROUP)),        # usage unreadable: the limit still bounds
    (str(300 * MB), str(400 * MB), (0, CGROUP)),      # over the limit: nothing left, never < 0
    (str(300 * MB), None, (300 * MB, CGROUP)),        # memory.current missing
    (None, "0", (8 * GB, MACHINE)),                    # memory.max missing
])
def test_cgroup_garbage_and_missing_files(tmp_path, limit, current, want):
    files = {"proc/self/cgroup": "0::/j\n"}
    if limit is not None:
        files["sys/fs/cgroup/j/memory.max"] = limit
    if current is not None:
        files["sys/fs/cgroup/j/memory.current"] = current
    files["sys/fs/cgroup/j/memory.stat"] = "inactive_file x\n"
    assert available_memory(tree(tmp_path, files)) == want


def test_nothing_readable(tmp_path):
    root = tree(tmp_path, {"proc/self/cgroup": "garbage\n::\n0::relative\n"}, meminfo=None)
    assert available_memory(root) == (None, None)
    assert available_memory(str(tmp_path / "nowhere")) == (None, None)
    root = tree(tmp_path, {"proc/meminfo": "MemTotal: 5 kB\n"}, meminfo=None)  # no MemAvailable
    assert available_memory(root) == (None, None)


def test_the_check_names_the_cgroup_limit(tmp_path, monkeypatch):
    root = tree(tmp_path, v2("/job", job=(300 * MB, 0, 0)))
    real = res.available_memory
    monkeypatch.setattr(res, "available_memory", lambda root_="/": real(root))
    cfg = get_config("scaled", vocab_size=65, batch_size=16)
    assert training_bytes(cfg) > 300 * MB
    with pytest.raises(ConfigError, match=r"needs about [\d.]+ GB of memory to train, but only "
                                          r"315 MB is available \(the cgroup's memory limit\); "
                                          r"lower --batch_size"):
        check_memory(cfg)
    # checkpoint.py asks available_bytes for the size an archive claims to unpack to
    path = str(tmp_path / "big.npz")
    np.savez(path, a=np.zeros(40 * MB, np.float64))  # claims 320 MB, compressed or not
    with pytest.raises(CheckpointError, match="unpacks to"):
        load_checkpoint(path)


def test_need_and_available_are_told_apart():
    """A need of 0.22 GB and 0.16 GB available were both written "0.2 GB"."""
    cfg = get_config("laptop", vocab_size=65)
    need = training_bytes(cfg)
    with pytest.raises(ConfigError) as e:
        check_memory(cfg, available=need - 40_000_000)
    said = [w for w in str(e.value).split() if w.replace(".", "").isdigit()]
    assert len(said) == 2 and said[0] != said[1], str(e.value)


def _own_memory_cgroup():
    """(folder of a new child of this process's memory cgroup, limit file) where one can be made."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    v2_mount, v1_mount = res._cgroup_mounts("/")
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            folders, limit = res._cgroup_folders("/", v1_mount, parts[2]), "memory.limit_in_bytes"
        elif len(parts) == 3 and parts[:2] == ["0", ""]:
            folders, limit = res._cgroup_folders("/", v2_mount, parts[2]), "memory.max"
        else:
            continue
        if folders and os.path.isdir(folders[0]):
            return os.path.join(folders[0], f"numgpt-test-{os.getpid()}"), limit
    return None


def test_train_refuses_cleanly_in_a_real_500mb_cgroup(python, repo, text_file, tmp_path):
    """Where this process may make a child memory cgroup (root, a writable hierarchy), train.py
    run inside one with a 500 MB limit refuses a 1.5 GB config in one line, instead of being
    killed by the OOM killer (exit 137) as when only /proc/meminfo was read."""
    found = _own_memory_cgroup()
    if found is None:
        pytest.skip("no memory cgroup of this process")
    folder, limit_file = found
    try:
        os.mkdir(folder)
    except OSError as e:
        pytest.skip(f"cannot make a memory cgroup here ({e.strerror})")
    try:
        try:
            with open(os.path.join(folder, limit_file), "w") as f:
                f.write(str(500 * MB))
        except OSError as e:
            pytest.skip(f"cannot limit a memory cgroup here ({e.strerror})")

        def enter():
            with open(os.path.join(folder, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        env = dict(os.environ, PYTHONPATH=repo)
        env.pop("NUMGPT_NO_MEMORY_CHECK", None)
        try:
            r = subprocess.run([python, os.path.join(repo, "train.py"), "--preset=scaled",
                                "--batch_size=16", f"--data={text_file}", "--max_iters=2",
                                f"--out_dir={tmp_path / 'o'}"], capture_output=True, text=True,
                               timeout=300, cwd=repo, env=env, preexec_fn=enter)
        except subprocess.SubprocessError as e:
            pytest.skip(f"cannot run a process in the cgroup ({e})")
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("error: this model needs about ")
        assert f"MB is available ({CGROUP})" in r.stderr
        assert not os.path.exists(tmp_path / "o" / "ckpt.npz")
    finally:
        try:
            os.rmdir(folder)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
