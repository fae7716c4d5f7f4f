"""Will a config fit in this machine's memory? Checked before anything big is allocated.

A run that asks for more memory than the machine has does not fail cleanly by itself: Linux
overcommits, so the allocations succeed and the kernel's OOM killer ends the process later
(exit 137, no message, possibly mid-write). So train.py and sample.py estimate what a config
needs and refuse, with one line, when it is more than the memory available now.

The estimate (float32; N = batch_size * block_size tokens, P parameters, F = feed-forward width):
    training  4 bytes * (4 P                     parameters, gradients, AdamW m and v
                       + N * n_layer * (12 C + 3 F)   activations kept for the backward pass (the
                                                  kernels keep F less where they recompute the
                                                  feed-forward activation, and no 2 C of
                                                  dropout masks)
                       + N * (n_layer * k + 3) H T    the T x T attention weights, where they are
                                                  kept: k = 3 per layer with dropout (weights,
                                                  mask, dropped weights), else 1, and 3 for one
                                                  layer's backward; the kernels keep them only
                                                  while one layer's fit kernels/ops.STORE_PROBS_BYTES
                                                  (k = 1, or 1.25 with the dropout mask's bytes),
                                                  else only the mask (k = 0.25, no 3 H T) and
                                                  a chunk's: 3 kernels/ops.CHUNK_BYTES a thread,
                                                  or 3 H T T entries where one sequence's is more
                       + N * (4 V + 8 C))         logits, their gradient, embeddings
    sampling  4 bytes * (P + 2 n_layer T C        parameters and the key/value cache
                       + 3 H T T + T (12 C + 3 F))  the prompt's (or a rebuild's) forward pass, whose
                                                  attention builds T x T scores per head
plus BASE_BYTES for Python, NumPy and numba. The estimates were checked against measured peaks
(the presets' training steps at several batch sizes, the NumPy path with dropout, sampling with a
long prompt): each came within 10% of its peak or above it (docs/benchmarks.md, "Memory
estimates against measured peaks").
"""
import dataclasses
import os
import re

from .config import ConfigError
from .env import switch

BASE_BYTES = 150 << 20


def num_params(cfg):
    """The parameter count of cfg, without listing n_layer blocks (cfg may be absurdly large)."""
    from .model import param_shapes

    def count(c):
        return sum(_prod(s) for s in param_shapes(c).values())
    if cfg.model == "bigram":
        return count(cfg)
    outer = count(dataclasses.replace(cfg, n_layer=0))
    per_block = count(dataclasses.replace(cfg, n_layer=1)) - outer
    return outer + cfg.n_layer * per_block


def _prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def training_bytes(cfg, step=None):
    """Bytes to train cfg with one of numgpt.parallel.STEPS, or (step None) with the hungriest of
    those that can train it here (the step is chosen by measuring them all)."""
    if step is None:
        from .parallel import candidates
        return max(training_bytes(cfg, s) for s in candidates(cfg))
    P = num_params(cfg)
    N = cfg.batch_size * cfg.block_size
    C, V = cfg.n_embd, cfg.vocab_size
    if cfg.model == "bigram":
        return BASE_BYTES + 4 * (4 * P + 4 * N * V)
    per_layer = 12 * C + 3 * cfg.ffn_hidden
    if cfg.kernels:
        per_layer -= _kernels_recompute(cfg, step)
    attn = 0
    if not cfg.kernels:
        kept = 3 if cfg.dropout > 0 else 1
        attn = N * (cfg.n_layer * kept + 3) * cfg.n_head * cfg.block_size
    elif _kernels_store_probs(cfg, step):
        kept = 1.25 if cfg.dropout > 0 else 1  # the probabilities, and the mask at a byte each
        attn = N * (cfg.n_layer * kept + 3) * cfg.n_head * cfg.block_size
    else:  # computed again in the backward, a chunk of sequences at a time: only the dropout
        #    mask is kept (a byte an entry), and a chunk's probabilities, their dropped copy and
        #    their gradient's take up to CHUNK_BYTES each (or one sequence's, if more), in each
        #    of the step's threads
        from numgpt.kernels.ops import CHUNK_BYTES
        attn = N * cfg.n_layer * 0.25 * cfg.n_head * cfg.block_size if cfg.dropout > 0 else 0
        chunk = max(CHUNK_BYTES, 4 * cfg.n_head * cfg.block_size ** 2)
        attn += 3 * chunk / 4 * _threads_of(cfg, step)
    return BASE_BYTES + int(4 * (4 * P + N * cfg.n_layer * per_layer + attn + N * (4 * V + 8 * C)))


def _threads_of(cfg, step):
    """How many threads run a step's layer calls at once: one per shard in the sharded step (one
    per core, at most one per row of the batch; numgpt.parallel.ShardedStep), else one."""
    if step != "sharded":
        return 1
    from .parallel import cores
    return max(1, min(cores(), cfg.batch_size))


def _call_rows(cfg, step):
    """The batch rows one call of a layer sees: the largest shard's in the sharded step."""
    return -(-cfg.batch_size // _threads_of(cfg, step))


def _kernels_recompute(cfg, step):
    """Activations per token and layer that the kernels do not keep (kernels/ops.py): the two
    dropout masks (they keep the seed), and the feed-forward activation where a call's is above
    kernels/ops.RECOMPUTE_BYTES (computed again in the backward)."""
    from numgpt.kernels.ops import RECOMPUTE_BYTES
    n = 2 * cfg.n_embd if cfg.dropout > 0 else 0
    B = _call_rows(cfg, step)
    if cfg.ffn_mult > 0 and 4 * B * cfg.block_size * cfg.ffn_hidden > RECOMPUTE_BYTES:
        n += cfg.ffn_hidden
    return n


def _kernels_store_probs(cfg, step):
    """Whether the kernels keep the T x T attention probabilities (see kernels/ops.py): the fused
    step (kernels/step.py) always does; the layer path decides per call, on the batch the call
    sees, which is a shard's slice of it in the sharded step."""
    from numgpt.kernels.ops import stores_probs

    from .parallel import FUSED
    if step in FUSED:
        return True
    B = _call_rows(cfg, step)
    return stores_probs(B, cfg.n_head, cfg.block_size, "float32")


def sampling_bytes(cfg):
    P = num_params(cfg)
    if cfg.model == "bigram":
        return BASE_BYTES + 4 * (P + 4 * cfg.vocab_size)
    T, C = cfg.block_size, cfg.n_embd
    cache = 2 * cfg.n_layer * T * C
    prefill = 3 * cfg.n_head * T * T + T * (12 * C + 3 * cfg.ffn_hidden)
    return BASE_BYTES + 4 * (P + cache + prefill + 4 * cfg.vocab_size)


def available_bytes(root="/"):
    """The bytes of memory this process may still use (see available_memory), or None."""
    return available_memory(root)[0]


def available_memory(root="/"):
    """(bytes, what bounds them) for the tightest of two limits, or (None, None) where neither
    can be read. root is where /proc and /sys are looked for (tests pass a fake tree).

    The machine: MemAvailable + SwapFree from /proc/meminfo ("free memory").
    The cgroup (Docker, Slurm, systemd): for the process's memory cgroup and each ancestor (a
    parent's limit applies to its children), the limit minus what the cgroup uses, where the cgroup
    has a limit ("the cgroup's memory limit"). Its inactive file cache is not counted as used: the
    kernel drops that before it kills. Swap is not counted under a cgroup limit: the limit is
    what the job was given, a cgroup's swap may be limited separately or not accounted at all
    (cgroup v1 without swapaccount), and whether the kernel swaps instead of killing cannot be
    told from here; an expert can skip the check with NUMGPT_NO_MEMORY_CHECK=1.
    """
    found = [(n, what) for n, what in ((_meminfo_bytes(root), "free memory"),
                                       (_cgroup_headroom(root), "the cgroup's memory limit"))
             if n is not None]
    return min(found, key=lambda f: f[0]) if found else (None, None)


def _read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _meminfo_bytes(root):
    """MemAvailable + SwapFree from /proc/meminfo, or None where that cannot be read."""
    text = _read(os.path.join(root, "proc/meminfo"))
    try:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in text.splitlines()
                if line.split()[1:2] and line.split()[1].isdigit()}
        return info["MemAvailable"] + info.get("SwapFree", 0)
    except (AttributeError, KeyError, ValueError, IndexError):
        return None


NO_LIMIT_V1 = 1 << 62  # cgroup v1 writes "no limit" as a huge number (9223372036854771712)


def _cgroup_headroom(root):
    """The least (limit - usage) over the process's memory cgroups (v2 and v1) and their
    ancestors that have a limit, never below 0; None where there is no limit or nothing to read."""
    v2_mount, v1_mount = _cgroup_mounts(root)
    rooms = []
    for line in (_read(os.path.join(root, "proc/self/cgroup")) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        if parts[0] == "0" and parts[1] == "":
            files = ("memory.max", "memory.current", "inactive_file")
            mount = v2_mount
        elif "memory" in parts[1].split(","):
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            mount = v1_mount
        else:
            continue
        for folder in _cgroup_folders(root, mount, parts[2]):
            room = _headroom(folder, *files)
            if room is not None:
                rooms.append(room)
    return min(rooms) if rooms else None


def _cgroup_mounts(root):
    """Where the cgroup v2 hierarchy and the v1 memory hierarchy are mounted, each as
    (mount point, the cgroup mounted there), from /proc/self/mountinfo; by default
    /sys/fs/cgroup and /sys/fs/cgroup/memory, both the root cgroup."""
    v2, v1 = None, None
    for line in (_read(os.path.join(root, "proc/self/mountinfo")) or "").splitlines():
        left, sep, right = line.partition(" - ")
        left, right = left.split(), right.split()
        if not sep or len(left) < 5 or len(right) < 3:
            continue
        found = (_unescape(left[4]), _unescape(left[3]))
        if right[0] == "cgroup2" and v2 is None:
            v2 = found
        elif right[0] == "cgroup" and "memory" in right[2].split(",") and v1 is None:
            v1 = found
    return v2 or ("/sys/fs/cgroup", "/"), v1 or ("/sys/fs/cgroup/memory", "/")


def _unescape(field):
    """A mountinfo path: spaces, tabs, newlines and backslashes are written as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _cgroup_folders(root, mount, path):
    """The folders of cgroup `path` and of its ancestors up to the mount's own cgroup."""
    point, mounted = mount
    if mounted != "/":
        if path != mounted and not path.startswith(mounted.rstrip("/") + "/"):
            return []  # this cgroup is not under the mounted one: its files cannot be seen
        path = path[len(mounted.rstrip("/")):]
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    base = os.path.join(root, point.lstrip("/"))
    return [os.path.join(base, *parts[:i]) for i in range(len(parts), -1, -1)]


def _headroom(folder, limit_file, usage_file, inactive_key):
    """limit - (usage - inactive file cache) of one cgroup folder; None where it has no limit or
    the limit cannot be read. An unreadable usage counts as 0 (the limit still bounds)."""
    limit = _read_int(os.path.join(folder, limit_file))
    if limit is None or limit >= NO_LIMIT_V1:
        return None
    usage = _read_int(os.path.join(folder, usage_file)) or 0
    stat = _read(os.path.join(folder, "memory.stat")) or ""
    for line in stat.splitlines():
        key, _, value = line.partition(" ")
        if key == inactive_key and _read_int_text(value) is not None:
            usage -= min(_read_int_text(value), usage)
            break
    return max(limit - usage, 0)


def _read_int(path):
    """The whole number in a file; None where it is missing, "max" (no limit) or not a number."""
    return _read_int_text(_read(path))


def _read_int_text(text):
    text = text.strip() if text is not None else ""
    return int(text) if text.isascii() and text.isdigit() else None


def _gb(n):
    """n bytes for a message, precise enough that a need and a smaller amount available differ."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def check_memory(cfg, what="train", available=None):
    """Raise ConfigError when cfg needs more memory than is available (what: train | sample)."""
    if switch("NUMGPT_NO_MEMORY_CHECK"):
        return
    need = training_bytes(cfg) if what == "train" else sampling_bytes(cfg)
    have, bound = available_memory() if available is None else (available, None)
    if have is not None and need > have:
        if what == "train":
            hint = "lower --batch_size, --block_size, --n_embd or --n_layer"
        else:
            hint = "this checkpoint is too large for this machine"
        raise ConfigError(f"this model needs about {_gb(need)} of memory to {what}, but only "
                          f"{_gb(have)} is available{f' ({bound})' if bound else ''}; {hint}")
