"""Will a config fit in this machine's memory? Checked before anything big is allocated.

A run that asks for more memory than the machine has does not fail cleanly by itself: Linux
overcommits, so the allocations succeed and the kernel's OOM killer ends the process later
(exit 137, no message, possibly mid-write). So train.py and sample.py estimate what a config
needs and refuse, with one line, when it is more than the memory available now.

The estimate (float32; N = batch_size * block_size tokens, P parameters, F = feed-forward width):
    training  4 bytes * (4 P                     parameters, gradients, AdamW m and v
                       + N * n_layer * (12 C + 3 F)   activations kept for the backward pass
                       + N * n_layer * 3 H T      the T x T attention weights (NumPy reference only)
                       + N * (4 V + 8 C))         logits, their gradient, embeddings
    sampling  4 bytes * (P + 2 n_layer T C)       parameters and the key/value cache
plus BASE_BYTES for Python, NumPy and numba. Measured peaks (scaled preset with batch 8 and 32,
laptop, preln with batch 2048) are within 10% of it.
"""
import dataclasses
import os

from .config import ConfigError

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


def training_bytes(cfg):
    P = num_params(cfg)
    N = cfg.batch_size * cfg.block_size
    C, V = cfg.n_embd, cfg.vocab_size
    if cfg.model == "bigram":
        return BASE_BYTES + 4 * (4 * P + 4 * N * V)
    per_layer = 12 * C + 3 * cfg.ffn_hidden
    if not cfg.kernels:
        per_layer += 3 * cfg.n_head * cfg.block_size
    return BASE_BYTES + 4 * (4 * P + N * cfg.n_layer * per_layer + N * (4 * V + 8 * C))


def sampling_bytes(cfg):
    P = num_params(cfg)
    cache = 0 if cfg.model == "bigram" else 2 * cfg.n_layer * cfg.block_size * cfg.n_embd
    return BASE_BYTES + 4 * (P + cache + 4 * cfg.vocab_size)


def available_bytes():
    """MemAvailable + SwapFree from /proc/meminfo, or None where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f
                    if line.split()[1:2] and line.split()[1].isdigit()}
        return info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _gb(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def check_memory(cfg, what="train", available=None):
    """Raise ConfigError when cfg needs more memory than is available (what: train | sample)."""
    if os.environ.get("NUMGPT_NO_MEMORY_CHECK"):
        return
    need = training_bytes(cfg) if what == "train" else sampling_bytes(cfg)
    have = available_bytes() if available is None else available
    if have is not None and need > have:
        if what == "train":
            hint = "lower --batch_size, --block_size, --n_embd or --n_layer"
        else:
            hint = "this checkpoint is too large for this machine"
        raise ConfigError(f"this model needs about {_gb(need)} of memory to {what}, but only "
                          f"{_gb(have)} is available; {hint}")
