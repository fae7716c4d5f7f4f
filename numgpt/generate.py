"""Sampling: temperature, top-k and top-p (nucleus), with a key/value cache.

Without a cache (the video's generate) every new token runs the model over the last block_size
tokens. With the cache each block keeps the keys and values of the positions it has seen, so a new
token costs one position's work. Positions are absolute (position embeddings), so when the cache
reaches block_size it is rebuilt from the last block_size // 2 tokens (at least one) in one forward
pass: the model then conditions on between block_size / 2 and block_size tokens of context, where
the uncached version always sees block_size.

With the kernels, that forward pass is one compiled call (KVCache.prefill), as is each new token
(KVCache.step); and, when no top-k / top-p filter is asked for, a whole run of tokens up to the
next rebuild is drawn and decoded in one call (KVCache.run), drawing what the token-by-token
loop draws.
"""
import math

import numpy as np

from .arch import SUBLAYERS, has_param
from .layers.attention import attention_forward, merge_heads, split_heads
from .layers.linear import linear_forward
from .model import _check_ids


class KVCache:
    """Keys and values of every block for the positions generated so far.

    k[i], v[i]: [B, H, block_size, hs] for block i; t: how many positions are filled.
    """

    def __init__(self, model, batch_size):
        cfg = model.cfg
        shape = (cfg.n_layer, batch_size, cfg.n_head, cfg.block_size, cfg.head_size)
        self.K = np.zeros(shape, dtype=model.dtype)  # all blocks in one array (for the kernel)
        self.V = np.zeros(shape, dtype=model.dtype)
        self.k = list(self.K)                          # views, one per block
        self.v = list(self.V)
        # q, k, v of a block as one [C, 3C] product (the parameters do not change while sampling)
        P = model.params
        self.w_qkv = np.stack([np.concatenate([P[f"blocks.{i}.attn.w_{n}"] for n in "qkv"], axis=1)
                               for i in range(cfg.n_layer)])
        self.n_head = cfg.n_head
        self.t = 0
        self.layout = None  # the compiled decoder's weight layout (decode.BY_*): None = measured
        self._args = None   # decode_step's model arguments, made at the first step
        self._step_params = None  # kernels/step.py's view of the parameters, made at prefill

    def prefill(self, model, ids):
        """Logits [B, V] of the next token after ids [B, n], the cache emptied and then holding
        ids' keys and values at positions 0 .. n-1: the same as
        model.forward(ids, kv=self)[0][:, -1] after t = 0. In one compiled call (kernels/step.py's
        forward pass) where the kernels can run the model, else through model.forward."""
        from .parallel import compiled_forward_applies, step_params
        self.t = 0
        if not (compiled_forward_applies(model.cfg) and model.dtype in (np.float32, np.float64)):
            return model.forward(ids, kv=self)[0][:, -1]
        from numgpt.kernels import step
        # the compiled code indexes its tables and the cache unchecked
        ids = _check_ids(ids, model.cfg.vocab_size, "the context")
        if ids.shape[0] != self.K.shape[1] or ids.shape[1] > model.cfg.block_size:
            raise ValueError(f"a cache of {self.K.shape[1]} rows and block_size "
                             f"{model.cfg.block_size} cannot take a context of shape {ids.shape}")
        if self._step_params is None:
            self._step_params = step_params(model)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        logits = np.empty((ids.shape[0], model.cfg.vocab_size), dtype=model.dtype)
        step.prefill(ids, *self._step_params, tuple(model.arch), self.w_qkv, self.K, self.V,
                     logits)
        self.t = ids.shape[1]
        return logits

    def step(self, model, ids):
        """Logits [B, V] of the next token after ids [B] at position t, in one compiled call
        (kernels/decode.py); the same as model.forward(ids[:, None], kv=self). The weights' layout
        is the one measured fastest for this model here (choose_layout, at the first step; cached
        for this machine and shape), or self.layout where it is set."""
        from numgpt.kernels import decode
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        logits = np.empty((ids.shape[0], model.cfg.vocab_size), dtype=model.dtype)
        if self._args is None:
            layout, args = self.layout, None
            if layout is None:
                layout, args = choose_layout(model, self, ids, logits)
            self._layout = layout
            self._args = args or _decode_args(model, self.w_qkv, layout)
        decode.decode_step(ids, self.t, *self._args, self.K, self.V, self._layout, logits)
        self.t += 1
        return logits

    def ready(self):
        """Whether run() can go on from here: a decode step has chosen the weights' layout."""
        return self._args is not None

    def run(self, logits, temperature, u):
        """(tokens [n, B], placed): n tokens drawn and decoded in one compiled call
        (kernels/decode.py's sample_and_decode). Token k is drawn from logits [B, V] with the
        uniforms u[k] as sample_rows draws it (the same as numgpt.generate.sample_from at that
        temperature), then decoded at position t into logits (t += 1), unless the cache is
        full; `placed` tokens were decoded (n, or n - 1 when the last found the cache full)."""
        from numgpt.kernels import decode
        room = self.K.shape[3] - self.t   # positions left in the cache
        if u.ndim != 2 or u.shape[1] != self.K.shape[1] or u.shape[0] > room + 1:
            raise ValueError(f"a run from position {self.t} of a cache of {self.K.shape[3]} "
                             f"positions and {self.K.shape[1]} rows cannot draw {u.shape}")
        tokens = np.empty(u.shape, dtype=np.int64)
        t0 = self.t
        self.t = decode.sample_and_decode(t0, *self._args, self.K, self.V, self._layout, logits,
                                          temperature, u, tokens)
        return tokens, self.t - t0

    def attend(self, x, p, layer):
        """Causal attention of the new positions x [B, n, C] over the cached ones plus themselves.

        The same computation as layers.attention.multihead_forward restricted to the new rows:
        q, k, v = x w_q, x w_k, x w_v (one product with the packed weights; p supplies the
        projection); the new k, v are stored at positions t .. t+n-1; row r (absolute position
        t + r) attends to positions 0 .. t + r (layers.attention.attention_forward with the
        queries the last n of the t + n cached positions).
        """
        C = x.shape[-1]
        t0, t1 = self.t, self.t + x.shape[1]
        qkv = linear_forward(x, self.w_qkv[layer])[0]                        # [B, n, 3C]
        q = split_heads(qkv[..., :C], self.n_head)                           # [B, H, n, hs]
        self.k[layer][:, :, t0:t1] = split_heads(qkv[..., C:2 * C], self.n_head)
        self.v[layer][:, :, t0:t1] = split_heads(qkv[..., 2 * C:], self.n_head)
        y = merge_heads(attention_forward(q, self.k[layer][:, :, :t1],         # [B, n, C]
                                          self.v[layer][:, :, :t1])[0])
        if "w_proj" in p:
            y = linear_forward(y, p["w_proj"], p["b_proj"])[0]
        return y


# while the tokens are streamed (generate's on_token), a compiled run of draws and decode steps
# holds at most this many, so that they arrive a few at a time; without, a run lasts until the
# cache is full
STREAMED_RUN = 8

# the compiled decoder's weight layouts (kernels/decode.py's _mv), by name
LAYOUTS = ("by_input", "by_output", "by_output_threads", "by_input_threads")
# the layouts' measurement (numgpt.parallel.time_in_turns): a decode step each per round, at
# least three rounds, then until MEASURE_SECONDS are spent or MAX_ROUNDS rounds are done
MEASURE_SECONDS = 0.1
MAX_ROUNDS = 200


def _decode_args(model, w_qkv, layout):
    """decode_step's arguments for the model: its Arch and its DecodeWeights for layout, as plain
    tuples (see decode_step). The blocks' parameters are stacked along a leading layer axis (the
    LayerNorms [L, sublayer, C], by numgpt.arch.SUBLAYERS); matrices transposed to [out, in] for
    the BY_OUTPUT layouts; zeros where the model has no such parameter."""
    from numgpt.kernels import decode
    cfg, a = model.cfg, model.arch
    P, L, C, F, dtype = model.params, cfg.n_layer, cfg.n_embd, cfg.ffn_hidden, model.dtype
    tr = layout in decode.TRANSPOSED

    def T(m):
        return np.ascontiguousarray(m.T) if tr else m

    def stack(name, shape):  # [L, ...] of block parameter name; shape where absent
        if not has_param(a, name):
            return np.zeros((L,) + shape, dtype=dtype)
        return np.ascontiguousarray(np.stack([T(P[f"blocks.{i}.{name}"]) for i in range(L)]))

    def norms(leaf):  # [L, N_SUB, C]: every sublayer's LayerNorm g or b
        return np.ascontiguousarray(np.stack([stack(f"{ln}.{leaf}", (C,)) for _, ln in SUBLAYERS],
                                             axis=1))

    def top(name):
        return P[name] if has_param(a, name) else np.zeros(0, dtype=dtype)
    weights = decode.DecodeWeights(
        tok_emb=P["tok_emb"], pos_emb=P["pos_emb"], ln_g=norms("g"), ln_b=norms("b"),
        w_qkv=np.ascontiguousarray(w_qkv.transpose(0, 2, 1)) if tr else w_qkv,
        w_proj=stack("attn.w_proj", (0, 0)), b_proj=stack("attn.b_proj", (C,)),
        w_fc=stack("ffn.w_fc", (0, C) if tr else (C, 0)), b_fc=stack("ffn.b_fc", (F,)),
        w_out=stack("ffn.w_out", (0, 0)), b_out=stack("ffn.b_out", (C,)),
        lnf_g=top("ln_f.g"), lnf_b=top("ln_f.b"), w_head=T(P["lm_head.w"]), b_head=P["lm_head.b"])
    return tuple(a), tuple(weights)


def layout_candidates():
    """The layouts that can run here: the threaded ones where the kernels may use threads."""
    from numgpt.kernels._jit import threads_allowed
    return [n for n in LAYOUTS if not n.endswith("_threads") or threads_allowed()]


def measure_layouts(model, kv, ids, logits, names, clock=None):
    """({name: median seconds}, {name: decode_step's model arguments}) of decode steps of ids at
    position kv.t in each layout, in turns. The steps are real ones (the keys and values they
    write at kv.t are the next step's), so nothing is computed for the measurement alone but
    the repeats."""
    import time

    from numgpt.kernels import decode

    from .parallel import time_in_turns
    clock = clock or time.perf_counter
    built, args = {}, {}
    for n in names:
        layout = getattr(decode, n.upper())
        tr = layout in decode.TRANSPOSED  # layouts of one orientation share their weights
        if tr not in built:
            built[tr] = _decode_args(model, kv.w_qkv, layout)
        args[n] = built[tr] + (kv.K, kv.V, layout, logits)
        decode.decode_step(ids, kv.t, *args[n])  # warm-up: first calls (threads, caches)
    times = time_in_turns(lambda n: decode.decode_step(ids, kv.t, *args[n]), names,
                          MEASURE_SECONDS, MAX_ROUNDS, clock)
    return {n: float(np.median(t)) for n, t in times.items()}, {n: a[:2] for n, a in args.items()}


def choose_layout(model, kv, ids, logits):
    """(layout, its decode_step arguments or None): the compiled decoder's fastest weight layout
    for this model and batch here, cached for this machine and shape (beside the training steps'
    choices, numgpt/parallel.py), else measured now on the step of ids at kv.t
    (measure_layouts) and cached."""
    from numgpt.kernels import decode

    from .parallel import fastest, measured_key
    cfg = model.cfg
    names = layout_candidates()
    shape = {"decoder": list(model.arch), "n_embd": cfg.n_embd, "ffn": cfg.ffn_hidden,
             "block_size": cfg.block_size, "vocab_size": cfg.vocab_size,
             "dtype": str(model.dtype), "batch": int(ids.shape[0])}
    key = measured_key(shape, names)
    best, built = _CHOSEN.get(key), {}
    if best is None:
        def measure():
            times, built["args"] = measure_layouts(model, kv, ids, logits, names)
            return times
        best, _ = fastest(key, names, measure)
        _CHOSEN[key] = best
    return getattr(decode, best.upper()), built["args"][best] if built else None


_CHOSEN = {}  # choose_layout's choices in this process (the cache file is read once a shape)


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
    # shift by the row maximum before scaling: (z - max) <= 0, so even a temperature of 1e-320
    # gives 0 and -inf here, never inf - inf = nan
    with np.errstate(over="ignore", divide="ignore"):
        z = (z - z.max(axis=-1, keepdims=True)) / temperature
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
             on_token=None, use_cache=True):
    """Extend idx [B, T0] by max_new_tokens sampled tokens; returns [B, T0 + max_new_tokens].

    on_token(ids [B]) is called with every new token, in order, for streaming output (with the
    kernels and no top-k / top-p filter, tokens come in compiled runs, so at most STREAMED_RUN
    of them are made before it sees them).
    use_cache=False runs the whole (cropped) context through the model for every token.
    """
    rng = rng or np.random.default_rng()
    idx = np.asarray(idx)
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError("generate needs a prompt of at least one token, shape [B, T0]")
    idx = _check_ids(idx, model.cfg.vocab_size, "the prompt").astype(np.int64)
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and not (isinstance(top_k, (int, np.integer))
                                  and not isinstance(top_k, bool) and top_k >= 0):
        raise ValueError(f"top_k must be a whole number >= 0 (0 or None = off), got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    out = [idx]
    cfg = model.cfg
    cache = use_cache and cfg.model == "gpt"
    fast = cache and cfg.kernels and model.dtype in (np.float32, np.float64)
    if cache:
        kv = KVCache(model, idx.shape[0])
        logits = kv.prefill(model, idx[:, -cfg.block_size:])
    plain = fast and temperature > 0 and not top_k and (top_p is None or top_p >= 1)
    if plain:
        from numgpt.kernels.decode import sample_rows
    B, made = idx.shape[0], 0

    def emit(nxt):
        out.append(nxt[:, None])
        if on_token is not None:
            on_token(nxt)

    def rebuild():  # the cache is full: refill it from the last half of the window
        return kv.prefill(model, np.concatenate(out, 1)[:, -max(1, cfg.block_size // 2):])
    while made < max_new_tokens:
        if plain and kv.ready():  # compiled: a run of draws and decode steps in one call
            n = min(max_new_tokens - made, cfg.block_size - kv.t + 1,
                    STREAMED_RUN if on_token is not None else max_new_tokens)
            tokens, placed = kv.run(logits, float(temperature), rng.random((n, B)))
            for nxt in tokens:
                emit(nxt)
            made += n
            if placed < n:  # the last token found the cache full
                logits = rebuild()
            continue
        if not cache:
            logits = model.next_token_logits(idx if len(out) == 1 else np.concatenate(out, 1))
        if plain:  # compiled: the same draw as below, without the filters
            nxt = np.empty(B, dtype=np.int64)
            sample_rows(logits, float(temperature), rng.random(B), nxt)
        else:
            nxt = sample_from(next_token_probs(logits, temperature, top_k, top_p), rng)
        emit(nxt)
        made += 1
        if cache:
            if kv.t == cfg.block_size:
                logits = rebuild()
            elif fast:
                logits = kv.step(model, nxt)
            else:
                logits = model.forward(nxt[:, None], kv=kv)[0][:, -1]
    return np.concatenate(out, axis=1)
