"""Sampling: temperature, top-k and top-p (nucleus) over the model's next-token distribution."""
import numpy as np


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """logits [B, V] -> probabilities [B, V] (float64) after temperature, top-k and top-p filtering.

    Computed stably: logits are scaled, shifted by their row maximum, then exponentiated, so a low
    temperature or huge logits cannot overflow. temperature 0 means greedy (argmax).
    """
    z = np.asarray(logits, dtype=np.float64)
    B, V = z.shape
    if temperature <= 0:
        probs = np.zeros_like(z)
        probs[np.arange(B), z.argmax(axis=-1)] = 1.0
        return probs
    z = z / temperature
    if top_k is not None and 0 < top_k < V:
        kth = np.partition(z, V - top_k, axis=-1)[:, V - top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and 0 < top_p < 1:
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        keep_sorted = (np.cumsum(sorted_p, axis=-1) - sorted_p) < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def sample_from(probs, rng):
    """One index per row of probs [B, V], drawn with rng (inverse-CDF, so it is reproducible)."""
    c = np.cumsum(probs, axis=-1)
    u = rng.random((probs.shape[0], 1)) * c[:, -1:]
    return np.minimum((c <= u).sum(axis=-1), probs.shape[1] - 1)


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, rng=None,
             on_token=None):
    """Extend idx [B, T0] by max_new_tokens sampled tokens; returns [B, T0 + max_new_tokens].

    on_token(ids [B]) is called after every new token, for streaming output.
    """
    rng = rng or np.random.default_rng()
    idx = np.asarray(idx, dtype=np.int64)
    for _ in range(max_new_tokens):
        probs = next_token_probs(model.next_token_logits(idx), temperature, top_k, top_p)
        nxt = sample_from(probs, rng)
        idx = np.concatenate([idx, nxt[:, None]], axis=1)
        if on_token is not None:
            on_token(nxt)
    return idx
