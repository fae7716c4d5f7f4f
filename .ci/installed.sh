#!/usr/bin/env bash
# numgpt installed, not cloned (issue 18): build the wheel from the clone's files and check that it
# holds only numgpt's own package (the kernels as numgpt/kernels) and its metadata; install it
# with its dependencies into a fresh virtual environment whose site-packages cannot be written
# (as root, which ignores permission bits, each command runs in a mount namespace of its own in
# which site-packages is bind-mounted read-only; as another user, the folder is made read-only
# with chmod; either way a write into it is tried first and must fail); there, from a folder outside the clone,
# train the bigram rung, sample, resume, and run the ladder's first rung (its kernels compile into
# the per-user cache, ~1 minute); the data and the kernels must land in ~/.cache/numgpt and
# nothing in site-packages. Then pip uninstall must leave nothing of numgpt.
#
#   bash .ci/installed.sh      (called by .ci/run; needs python3 with venv and pip's package index)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/numgpt-installed.XXXXXX")
SITE=""
cleanup() {
    [ -n "$SITE" ] && chmod -R u+w "$SITE" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
chmod 755 "$WORK"
say() { echo "installed: $* [${SECONDS} s]"; }
fail() { echo "installed: FAILED: $*" >&2; exit 1; }

# ---- the wheel, built from a copy of the sources (the build writes nothing into the clone)
mkdir "$WORK/src"
tar -C "$REPO" --exclude=__pycache__ -cf - setup.cfg pyproject.toml README.md numgpt kernels |
    tar -C "$WORK/src" -xf -
"$PY" -m pip wheel -q --no-deps "$WORK/src" -w "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/numgpt-*.whl)
say "built $(basename "$WHEEL")"
"$PY" - "$WHEEL" "$WORK/src" <<'EOF'
import os, re, sys, zipfile
wheel, src = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
own = re.compile(r"numgpt/|numgpt-[^/]+\.dist-info/")
stray = [n for n in names if not own.match(n)]
assert not stray, f"the wheel holds files outside numgpt's package: {stray}"
want = set()  # every module of the clone's numgpt/ and kernels/, the kernels as numgpt/kernels
for top, dest in (("numgpt", "numgpt"), ("kernels", "numgpt/kernels")):
    for d, _, files in os.walk(os.path.join(src, top)):
        rel = os.path.relpath(d, os.path.join(src, top))
        want |= {os.path.normpath(os.path.join(dest, rel, f)) for f in files if f.endswith(".py")}
missing = sorted(want - set(names))
assert not missing, f"the wheel lacks {missing}"
print(f"installed: the wheel holds numgpt/ ({len(want)} modules, the kernels as numgpt/kernels) "
      "and its metadata, nothing else")
EOF

# ---- a fresh virtual environment with the wheel and its dependencies
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$WHEEL"
say "installed it with its dependencies into a fresh virtual environment"
SITE=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
[ ! -e "$SITE/kernels" ] || fail "a top-level package named kernels was installed"
find "$SITE" | sort > "$WORK/site-before"

# ---- site-packages read-only, and a user with a home of its own
mkdir "$WORK/home" "$WORK/run"
if [ "$(id -u)" = 0 ]; then
    # shellcheck disable=SC2016
    READ_ONLY=(unshare --mount --propagation private sh -c
               'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"' "$SITE")
    say "each command runs with site-packages mounted read-only (root ignores permission bits)"
else
    chmod -R a-w "$SITE"
    READ_ONLY=()
fi
SHAKESPEARE="$REPO/../shared/data/tinyshakespeare/input.txt"
USER_ENV=(PATH="$WORK/venv/bin:/usr/bin:/bin" HOME="$WORK/home" LANG=C.UTF-8)
DATA=()
if [ -f "$SHAKESPEARE" ]; then
    USER_ENV+=(NUMGPT_SHAKESPEARE="$SHAKESPEARE")
else  # elsewhere: any text will do for a smoke run
    cp "$REPO/README.md" "$WORK/corpus.txt"
    chmod 644 "$WORK/corpus.txt"
    DATA=(--data="$WORK/corpus.txt")
fi
run() {  # the commands as a user would run them: the venv's bin on PATH, no clone in sight
    (cd "$WORK/run" && "${READ_ONLY[@]}" env -i "${USER_ENV[@]}" "$@")
}
probe=$(run python -c "
try:
    open('$SITE/probe-write', 'w')
    print('written')
except OSError as e:
    print('refused:', e.strerror)" 2>&1) || true
case "$probe" in
    refused:*) say "a write into site-packages is refused ($probe)" ;;
    *) fail "site-packages is not read-only for the commands ($probe); the check would prove nothing" ;;
esac
FEW=(--preset=bigram --kernels=false --eval_interval=10 --eval_iters=4 "${DATA[@]}")

# ---- the commands, from a folder outside the clone
run numgpt --help > "$WORK/help" && grep -q "ladder" "$WORK/help" || fail "numgpt --help lists no commands"
rc=0; run python -m numgpt bogus 2> "$WORK/err" || rc=$?
[ "$rc" = 2 ] && [ "$(wc -l < "$WORK/err")" = 1 ] || fail "an unknown command gave exit $rc: $(cat "$WORK/err")"
run numgpt-train "${FEW[@]}" --max_iters=20 --out_dir=bigram > "$WORK/log" 2>&1 || { cat "$WORK/log"; fail "numgpt-train"; }
say "numgpt-train: $(grep -o 'step 20.*' "$WORK/log" | head -1)"
run numgpt-sample --out_dir=bigram --max_new_tokens=80 > "$WORK/sample" || fail "numgpt-sample"
say "numgpt-sample wrote $(wc -c < "$WORK/sample") bytes"
run python -m numgpt train "${FEW[@]}" --max_iters=40 --out_dir=bigram --resume > "$WORK/log" 2>&1 ||
    { cat "$WORK/log"; fail "python -m numgpt train --resume"; }
grep -q "step 40" "$WORK/log" || { cat "$WORK/log"; fail "the resumed run did not reach step 40"; }
say "python -m numgpt train --resume: on to step 40"
# the ladder's first rung, kernels on: they compile (first run only) into the per-user cache
run numgpt-ladder --stages=bigram --iters-scale=0.02 --out-dir=ladder "${DATA[@]}" > "$WORK/log" 2>&1 ||
    { cat "$WORK/log"; fail "numgpt-ladder --stages=bigram"; }
grep -q "^bigram " "$WORK/log" || { cat "$WORK/log"; fail "the ladder printed no bigram row"; }
say "numgpt-ladder --stages=bigram: $(grep "^bigram " "$WORK/log" | tr -s ' ' | cut -d' ' -f1-4)"
run python -c "import numgpt.kernels as k; assert k.cache_is_warm(fused=False), k._cache_dir()" ||
    fail "the compiled kernels are not in the per-user cache"

# ---- where everything went
CACHE="$WORK/home/.cache/numgpt"
[ -n "${DATA[*]}" ] || [ -f "$CACHE/data/shakespeare_char/train.bin" ] || fail "no prepared data in $CACHE/data"
ls "$CACHE"/kernels/numba-*/*.nbi > /dev/null || fail "no compiled kernels in $CACHE/kernels"
[ -f "$WORK/run/bigram/ckpt.npz" ] && [ -f "$WORK/run/ladder/ladder.png" ] || fail "out_dir is not relative to the working folder"
find "$SITE" | sort | diff "$WORK/site-before" - || fail "site-packages changed"
say "data and kernels in ~/.cache/numgpt ($(du -sh "$CACHE" | cut -f1)), runs in the working folder, site-packages unchanged"

# ---- uninstall leaves nothing of numgpt
chmod -R u+w "$SITE"
"$WORK/venv/bin/python" -m pip uninstall -q -y numgpt
left=$(cd "$SITE" && ls -d numgpt* kernels 2>/dev/null || true; ls "$WORK/venv/bin" | grep numgpt || true)
[ -z "$left" ] || fail "pip uninstall left: $left"
say "pip uninstall left nothing of numgpt in site-packages; all good"
