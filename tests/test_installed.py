"""numgpt installed as a package, not only cloned (issue 18), with its kernels as numgpt.kernels,
so that another distribution's top-level `kernels` package does not break it (issue 14, item 5).

The slow test builds numgpt's wheel, installs it and a dummy distribution owning a top-level
`kernels` package into one fresh virtual environment (its dependencies are the test's own,
reached through a .pth file, so nothing is downloaded), and runs the commands there. It is
skipped, with the reason, where no wheel can be built; under CI (tests/required.py) that is
a failure instead.
"""
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import numgpt
from numgpt import commands, paths
from required import may_not_skip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- clone or installed: where things go ----

def _tree(root, setup_cfg=None, pyproject=None, kernels=True):
    os.makedirs(os.path.join(root, "numgpt"))
    if kernels:
        os.makedirs(os.path.join(root, "kernels"))
        open(os.path.join(root, "kernels", "_jit.py"), "w").close()
    if setup_cfg is not None:
        with open(os.path.join(root, "setup.cfg"), "w") as f:
            f.write(setup_cfg)
    if pyproject is not None:
        with open(os.path.join(root, "pyproject.toml"), "w") as f:
            f.write(pyproject)
    return str(root)


def test_a_clone_is_told_from_site_packages(tmp_path):
    assert paths.is_clone(REPO) and paths.IN_CLONE  # the tests run from a clone
    assert paths.is_clone(_tree(tmp_path / "a", setup_cfg="[metadata]\nname = numgpt\n"))
    assert paths.is_clone(_tree(tmp_path / "b", pyproject='[project]\nname = "numgpt"\n'))
    # site-packages with another distribution's top-level kernels/ folder
    assert not paths.is_clone(_tree(tmp_path / "c"))
    assert not paths.is_clone(_tree(tmp_path / "d", setup_cfg="[metadata]\nname = numgpt-extras\n"))
    assert not paths.is_clone(_tree(tmp_path / "e", setup_cfg="[metadata]\nname = numgpt\n",
                                    kernels=False))


def test_installed_data_and_kernels_go_to_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMGPT_DATA_DIR", raising=False)
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    home_cache = str(tmp_path / "home" / ".cache" / "numgpt")
    assert paths.user_cache_dir() == home_cache
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored (XDG's rule)
    assert paths.user_cache_dir() == home_cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.user_cache_dir() == str(tmp_path / "xdg" / "numgpt")

    installed_kernels = os.path.join(str(tmp_path), "site-packages", "numgpt", "kernels")
    assert paths.data_dir() == os.path.join(REPO, "data")  # in the clone, as before
    assert paths.kernel_cache_base(os.path.join(REPO, "kernels")) == os.path.join(
        REPO, "kernels", "__pycache__")
    assert paths.kernel_cache_base(installed_kernels) == str(tmp_path / "xdg" / "numgpt" / "kernels")
    monkeypatch.setattr(paths, "IN_CLONE", False)
    assert paths.data_dir() == str(tmp_path / "xdg" / "numgpt" / "data")
    assert paths.kernel_cache_base(os.path.join(REPO, "kernels")) == str(
        tmp_path / "xdg" / "numgpt" / "kernels")
    monkeypatch.setenv("NUMGPT_DATA_DIR", str(tmp_path / "mine"))  # the overrides still win
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    assert paths.data_dir() == str(tmp_path / "mine")
    assert paths.kernel_cache_base(installed_kernels) == str(tmp_path / "numba")


def test_the_shared_copy_beside_the_clone_is_looked_up_only_in_a_clone(monkeypatch):
    from numgpt import data
    shared = os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare", "input.txt")
    assert shared in data.local_shakespeare_candidates()
    monkeypatch.setattr(paths, "IN_CLONE", False)
    assert shared not in data.local_shakespeare_candidates()


def test_a_cache_folder_that_cannot_be_written_means_no_cache(tmp_path):
    """Not numba's fallbacks: a __pycache__ beside the sources (inside site-packages when
    installed) or numba's own folder, where no hash of the kernel sources guards the code."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = ("import numgpt.kernels._jit as j, numgpt.kernels.embedding as e\n"
            "from numba.typed import typedlist\n"
            "print(j.CACHE_WRITABLE, j.OPTIONS['cache'], type(e.embed_fwd._cache).__name__,"
            " type(typedlist._make_list._cache).__name__)\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(blocker / "cache"))  # under a file: never a folder
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "NullCache", "NullCache"]


def test_no_module_imports_a_top_level_kernels_package():
    pattern = re.compile(r"^\s*(import kernels\b|from kernels\b)", re.M)
    offenders = []
    for top in ("numgpt", "kernels", "tests", "bench", "data"):
        for d, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith(".py"):
                    with open(os.path.join(d, f), encoding="utf-8") as fh:
                        if pattern.search(fh.read()):
                            offenders.append(os.path.join(d, f))
    assert not offenders


# ---- the commands ----

def test_python_m_numgpt_lists_its_commands(capsys):
    assert commands.main(["--help"], prog="python -m numgpt") == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m numgpt COMMAND")
    assert all(f"  {name} " in out for name in ("train", "sample", "ladder"))
    assert commands.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"numgpt {numgpt.__version__}"


@pytest.mark.parametrize("argv", [[], ["bogus"], ["--preset=bigram"]])
def test_an_unknown_command_is_one_line_and_exit_2(argv, capsys):
    assert commands.main(argv, prog="python -m numgpt") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "train, sample, ladder" in err


def _numgpt(*args, cwd, script=None):
    """python -m numgpt ARGS (or a console script's function) in a process of its own: the
    commands take over the process's standard streams and signals (numgpt/cli.py)."""
    cmd = ([sys.executable, "-m", "numgpt", *args] if script is None else
           [sys.executable, "-c", f"import sys, numgpt.commands as c; sys.exit(c.{script}())", *args])
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_the_commands_name_themselves_as_called(tmp_path, capsys):
    p = _numgpt("train", "--help", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.startswith("usage: python -m numgpt train [--preset=NAME]")
    p = _numgpt("--help", cwd=tmp_path, script="sample")  # as the console script numgpt-sample
    lines = p.stdout.splitlines()
    assert lines[0].startswith("usage: numgpt-sample [--out_dir=DIR]")
    assert lines[1].startswith(" " * len("usage: numgpt-sample ") + "[--max_new_tokens")
    p = _numgpt(f"--out_dir={tmp_path}", cwd=tmp_path, script="sample")
    assert p.returncode == 2 and "train one first with numgpt-train" in p.stderr
    p = _numgpt("sample", f"--out_dir={tmp_path}", cwd=tmp_path)
    assert p.returncode == 2 and "train one first with python -m numgpt train" in p.stderr
    assert p.stderr.count("\n") == 1
    with pytest.raises(SystemExit) as e:  # argparse's own --help
        commands.ladder(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: numgpt-ladder")


def test_the_commands_train_and_sample_as_train_py_does(tmp_path, text_file):
    args = ["--preset=bigram", "--kernels=false", f"--data={text_file}", "--out_dir=run",
            "--eval_interval=2", "--eval_iters=2", "--batch_size=4"]
    p = _numgpt(*args, "--max_iters=4", cwd=tmp_path, script="train")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "run" / "ckpt.npz").is_file()  # out_dir relative to the working folder
    p = _numgpt("sample", "--out_dir=run", "--max_new_tokens=20", cwd=tmp_path)
    assert p.returncode == 0 and len(p.stdout) > 20, p.stderr
    p = _numgpt("train", *args, "--max_iters=6", "--resume", cwd=tmp_path)
    assert p.returncode == 0 and "resuming from step 4" in p.stdout, p.stderr


# ---- a wheel in a fresh virtual environment, beside another distribution's `kernels` ----

def _site_packages(venv):
    return subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def _venv_with_our_dependencies(venv):
    """A virtual environment without pip whose only packages are the test's own dependencies
    (numpy, numba, ...), reached through a .pth file: no numgpt, no top-level `kernels`."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True,
                   capture_output=True, timeout=120)
    ours = os.path.dirname(os.path.dirname(np.__file__))
    deps = venv + "-deps"
    os.makedirs(deps)
    for name in os.listdir(ours):
        low = name.lower()
        if (low.startswith(("numgpt", "__editable__", "kernels")) or low.endswith(".pth")
                or name == "__pycache__"):
            continue
        os.symlink(os.path.join(ours, name), os.path.join(deps, name))
    with open(os.path.join(_site_packages(venv), "_test_dependencies.pth"), "w") as f:
        f.write(deps + "\n")
    return os.path.join(venv, "bin", "python")


def _pip(python, *args, cwd=None):
    """The test's pip acting on another interpreter's environment (pip --python, pip >= 22.3)."""
    return subprocess.run([sys.executable, "-m", "pip", "--python", python, *args,
                           "--disable-pip-version-check"], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def _unbuildable(why):
    if may_not_skip():
        pytest.fail(f"cannot build or install a wheel here: {why}")
    pytest.skip(f"cannot build or install a wheel here: {why}")


def _last_line(proc):
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines()
             if ln.strip() and not ln.startswith("WARNING: Location")]
    return lines[-1] if lines else f"exit {proc.returncode}"


@pytest.fixture(scope="module")
def numgpt_wheel(tmp_path_factory):
    """numgpt's wheel, built from a copy of its sources (nothing is written into the clone)."""
    try:
        import pip
        if tuple(int(x) for x in pip.__version__.split(".")[:2]) < (22, 3):
            _unbuildable(f"pip {pip.__version__} has no --python option (22.3 or later)")
    except ImportError:
        _unbuildable("pip is not installed")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("numgpt", "kernels"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src),
                            "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=600)
    if built.returncode != 0:
        _unbuildable(_last_line(built))
    (wheel,) = (tmp / "dist").iterdir()
    return str(wheel)


def test_the_wheel_holds_only_numgpt(numgpt_wheel):
    names = zipfile.ZipFile(numgpt_wheel).namelist()
    assert all(re.match(r"numgpt/|numgpt-[^/]+\.dist-info/", n) for n in names), names
    modules = {os.path.join("numgpt/kernels" if top == "kernels" else "numgpt",
                            os.path.relpath(os.path.join(d, f), os.path.join(REPO, top)))
               for top in ("numgpt", "kernels") for d, _, files in os.walk(os.path.join(REPO, top))
               for f in files if f.endswith(".py")}
    assert modules <= set(names)
    entry = zipfile.ZipFile(numgpt_wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("numgpt", "numgpt-train", "numgpt-sample", "numgpt-ladder"):
        assert re.search(rf"^{script} = numgpt\.commands:", entry, re.M), entry


def test_installed_beside_another_kernels_package(numgpt_wheel, tmp_path, text_file):
    python = _venv_with_our_dependencies(str(tmp_path / "venv"))
    bin_dir = os.path.dirname(python)
    site = _site_packages(str(tmp_path / "venv"))
    dummy = tmp_path / "dummy"
    (dummy / "kernels").mkdir(parents=True)
    (dummy / "kernels" / "__init__.py").write_text(
        '"""Stands in for the PyPI package named kernels."""\n\n'
        'def hello():\n    return "the other kernels"\n')
    (dummy / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "kernels"\nversion = "0.0.1"\n\n[tool.setuptools]\npackages = ["kernels"]\n')
    for what in (numgpt_wheel, str(dummy)):
        done = _pip(python, "install", "-q", "--no-deps", what)
        if done.returncode != 0:
            _unbuildable(f"pip install {os.path.basename(what)}: {_last_line(done)}")
    assert sorted(n for n in os.listdir(site) if n.startswith(("numgpt", "kernels"))) == [
        "kernels", "kernels-0.0.1.dist-info", "numgpt", "numgpt-0.1.0.dist-info"]

    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMGPT_DATA_DIR", "NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "PYTHONPATH",
                        "NUMGPT_SHAKESPEARE", "VIRTUAL_ENV")}
    env.update(HOME=str(home), PATH=bin_dir + os.pathsep + env.get("PATH", ""))
    numba_dir = os.path.dirname(subprocess.run(
        [python, "-c", "import numba; print(numba.__file__)"], capture_output=True, text=True,
        check=True).stdout.strip())  # numba's own __pycache__ folders: where its fallbacks write

    def listing():
        return sorted(os.path.join(d, f) for top in (site, numba_dir)
                      for d, _, fs in os.walk(top) for f in fs)
    before = listing()

    def run(*cmd, cwd=work, **extra):
        p = subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd, timeout=300,
                           env=dict(env, **extra))
        assert p.returncode == 0, (cmd, p.stdout[-2000:], p.stderr[-2000:])
        return p.stdout

    where = run(python, "-c", "import kernels, numgpt.kernels as k\n"
                "print(kernels.hello()); print(k.__file__); print(callable(k.warmup))")
    assert where.splitlines() == ["the other kernels",
                                  os.path.join(site, "numgpt", "kernels", "__init__.py"), "True"]
    # and in the other order: numgpt's kernels loaded first leave the name kernels to its owner
    later = run(python, "-c", "import numgpt.kernels as k, numgpt.kernels.step\n"
                "import kernels\nprint(kernels.hello()); print('hello' in vars(k))")
    assert later.splitlines() == ["the other kernels", "False"]
    few = ["--preset=bigram", "--kernels=false", f"--data={text_file}", "--out_dir=run",
           "--eval_interval=2", "--eval_iters=2", "--batch_size=4"]
    run(os.path.join(bin_dir, "numgpt-train"), *few, "--max_iters=4")
    prepared = home / ".cache" / "numgpt" / "data"
    assert [p.name.startswith("corpus-") for p in prepared.iterdir()] == [True]
    assert (work / "run" / "ckpt.npz").is_file()
    assert run(python, "-m", "numgpt", "sample", "--out_dir=run", "--max_new_tokens=30")
    assert "resuming from step 4" in run(os.path.join(bin_dir, "numgpt"), "train", *few,
                                         "--max_iters=6", "--resume")
    assert "--stages" in run(python, "-m", "numgpt.ladder", "--help")
    cache = run(python, "-c", "import numgpt.kernels._jit as j; print(j.CACHE_DIR)",
                XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert cache.startswith(os.path.join(str(tmp_path / "xdg"), "numgpt", "kernels", "numba-"))
    # a clone beside it still runs its own numgpt and kernels (numgpt from the working folder)
    clone = run(python, "-c", "import numgpt, numgpt.kernels as k; print(numgpt.__file__, k.__file__)",
                cwd=REPO)
    assert clone.split() == [os.path.join(REPO, "numgpt", "__init__.py"),
                             os.path.join(REPO, "kernels", "__init__.py")]

    assert listing() == before  # nothing written inside site-packages
    done = _pip(python, "uninstall", "-y", "numgpt")
    assert done.returncode == 0, done.stderr
    assert sorted(n for n in os.listdir(site) if n.startswith(("numgpt", "kernels"))) == [
        "kernels", "kernels-0.0.1.dist-info"]
    assert not [n for n in os.listdir(bin_dir) if n.startswith("numgpt")]
    assert run(python, "-c", "import kernels; print(kernels.hello())").strip() == "the other kernels"


def test_a_plain_clone_runs_without_any_install(tmp_path, text_file):
    """No install at all: numgpt importable from the clone's root, as for python train.py."""
    python = _venv_with_our_dependencies(str(tmp_path / "venv"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["NUMGPT_DATA_DIR"] = str(tmp_path / "data")
    p = subprocess.run([python, "train.py", "--preset=bigram", "--kernels=false",
                        f"--data={text_file}", f"--out_dir={tmp_path / 'run'}", "--max_iters=2",
                        "--eval_interval=2", "--eval_iters=2", "--batch_size=4"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([python, "-c", "import numgpt.kernels as k; print(k.__file__)"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.stdout.strip() == os.path.join(REPO, "kernels", "__init__.py"), p.stderr
