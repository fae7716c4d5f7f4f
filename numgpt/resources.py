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
                                                  else only the mask (k = 0.25, no 3 H T)
                       + N * (4 V + 8 C))         logits, their gradient, embeddings
    sampling  4 bytes * (P + 2 n_layer T C        parameters and the key/value cache
                       + 3 H T T + T (12 C + 3 F))  the prompt's (or a rebuild's) forward pass, whose
                                                  attention builds T x T scores per head
plus BASE_BYTES for Python, NumPy and numba. Against measured peaks: the scaled preset at batch
64, 3.4 GB estimated for 2.69-2.78 GB used (before the kernels stopped keeping dropout masks and big
feed-forward activations, 4.3 GB for 3.5 GB); at batch 8 (which keeps its probabilities) 0.90 GB
for 0.89-0.92 GB; laptop 218 MB for 201 MB; preln at batch 2048 and the scaled preset at batch 32
within 10% (before the stored-probabilities path); the NumPy path with 16 heads over 1024 positions and dropout, 2.64 GB for
2.57 GB; sampling a block-4096 model with a long prompt, 3.4 GB for 3.46 GB.
"""
import dataclasses

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
    elif cfg.dropout > 0:  # the fused kernels keep only the dropout mask, a byte an entry
        attn = N * cfg.n_layer * 0.25 * cfg.n_head * cfg.block_size
    return BASE_BYTES + int(4 * (4 * P + N * cfg.n_layer * per_layer + attn + N * (4 * V + 8 * C)))


def _kernels_recompute(cfg, step):
    """Activations per token and layer that the kernels do not keep (kernels/ops.py): the two
    dropout masks (they keep the seed), and the feed-forward activation where a call's is above
    kernels/ops.RECOMPUTE_BYTES (computed again in the backward)."""
    from numgpt.kernels.ops import RECOMPUTE_BYTES
    n = 2 * cfg.n_embd if cfg.dropout > 0 else 0
    B = -(-cfg.batch_size // 2) if step == "sharded" else cfg.batch_size
    if cfg.ffn_mult > 0 and 4 * B * cfg.block_size * cfg.ffn_hidden > RECOMPUTE_BYTES:
        n += cfg.ffn_hidden
    return n


def _kernels_store_probs(cfg, step):
    """Whether the kernels keep the T x T attention probabilities (see kernels/ops.py): the fused
    step (kernels/step.py) always does; the layer path decides per call, on the batch the call
    sees, which is half of it in the sharded step."""
    from numgpt.kernels.ops import stores_probs
    if step == "fused":
        return True
    B = -(-cfg.batch_size // 2) if step == "sharded" else cfg.batch_size
    return stores_probs(B, cfg.n_head, cfg.block_size, "float32")


def sampling_bytes(cfg):
    P = num_params(cfg)
    if cfg.model == "bigram":
        return BASE_BYTES + 4 * (P + 4 * cfg.vocab_size)
    T, C = cfg.block_size, cfg.n_embd
    cache = 2 * cfg.n_layer * T * C
    prefill = 3 * cfg.n_head * T * T + T * (12 * C + 3 * cfg.ffn_hidden)
    return BASE_BYTES + 4 * (P + cache + prefill + 4 * cfg.vocab_size)


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
    if switch("NUMGPT_NO_MEMORY_CHECK"):
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
