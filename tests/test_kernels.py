"""Every numba kernel equals its NumPy reference (float32 tolerance; float64 to round-off), the
kernels' backward passes pass the float64 gradient check themselves, and so does the whole model
with kernels on."""
import numpy as np
import pytest

import numgpt
from numgpt.kernels.ops import KERNELS as K
from numgpt.gradcheck import check_layer
from numgpt.ops import REFERENCE as R
from numgpt.optim import AdamW

B, T, C = 3, 7, 12


def rnd(*shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.fixture(params=["stored", "stored-blocks", "again", "again-chunks"])
def attention_path(request, monkeypatch):
    """Run the test with attention's probabilities kept for the backward and computed again there
    (kernels/ops.py); kept, also with the products cut into causal blocks of 2 rows
    (kernels/ops._causal_bmm); computed again, one sequence at a time and two (B = 3: a chunk of
    two and one of one)."""
    import numgpt.kernels.ops
    stored = request.param.startswith("stored")
    monkeypatch.setattr(numgpt.kernels.ops, "STORE_PROBS_BYTES", 1 << 40 if stored else -1)
    if request.param == "stored-blocks":
        monkeypatch.setattr(numgpt.kernels.ops, "CAUSAL_BLOCK", 2)
    chunk = 2 if request.param == "again-chunks" else 1
    monkeypatch.setattr(numgpt.kernels.ops, "_chunk_sequences", lambda *a: chunk)
    return "stored" if stored else "again"


def close(a, b, dtype):
    if dtype == np.float32:
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_kernel_equals_reference(dtype):
    idx = np.random.default_rng(0).integers(0, 9, (B, T))
    idx[0, :4] = 3
    W, P = rnd(9, C, dtype=dtype), rnd(T + 2, C, seed=1, dtype=dtype)
    (yk, ck), (yr, cr) = K.embed_forward(idx, W, P), R.embed_forward(idx, W, P)
    close(yk, yr, dtype)
    d = rnd(B, T, C, seed=2, dtype=dtype)
    for a, b in zip(K.embed_backward(d, ck), R.embed_backward(d, cr)):
        assert a.dtype == dtype
        close(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_kernel_equals_reference(dtype):
    x, g, b = rnd(B, T, C, dtype=dtype) * 3 + 1, rnd(C, seed=1, dtype=dtype), rnd(C, seed=2, dtype=dtype)
    (yk, ck), (yr, cr) = K.layernorm_forward(x, g, b), R.layernorm_forward(x, g, b)
    close(yk, yr, dtype)
    d = rnd(B, T, C, seed=3, dtype=dtype)
    for a, r in zip(K.layernorm_backward(d, ck), R.layernorm_backward(d, cr)):
        assert a.dtype == dtype
        close(a, r, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("proj,H,drop", [(False, 1, 0.0), (True, 3, 0.0), (True, 4, 0.3)])
def test_multihead_kernel_equals_reference(dtype, proj, H, drop, attention_path):
    p = {n: rnd(C, C, seed=i, dtype=dtype) * 0.5 for i, n in enumerate(["w_q", "w_k", "w_v"])}
    if proj:
        p.update(w_proj=rnd(C, C, seed=5, dtype=dtype), b_proj=rnd(C, seed=6, dtype=dtype))
    x = rnd(B, T, C, seed=7, dtype=dtype)
    yk, ck = K.multihead_forward(x, p, H, drop, drop, np.random.default_rng(1))
    yr, cr = R.multihead_forward(x, p, H, drop, drop, np.random.default_rng(1))
    assert (ck[3] is not None) == (attention_path == "stored")  # the probabilities, when stored
    close(yk, yr, dtype)
    d = rnd(B, T, C, seed=8, dtype=dtype)
    dxk, gk = K.multihead_backward(d, ck)
    dxr, gr = R.multihead_backward(d, cr)
    close(dxk, dxr, dtype)
    assert set(gk) == set(gr)
    for k in gr:
        assert gk[k].dtype == dtype
        close(gk[k], gr[k], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act,proj,drop", [("relu", True, 0.0), ("gelu", True, 0.2),
                                           ("relu", False, 0.0)])
@pytest.mark.parametrize("recompute", [False, True])
def test_feedforward_kernel_equals_reference(dtype, act, proj, drop, recompute, monkeypatch):
    """recompute: the activation is not kept but computed again in the backward (big layers,
    kernels/ops.RECOMPUTE_BYTES)."""
    import numgpt.kernels.ops
    monkeypatch.setattr(numgpt.kernels.ops, "RECOMPUTE_BYTES", -1 if recompute else 1 << 40)
    F = 20 if proj else C
    p = {"w_fc": rnd(C, F, dtype=dtype), "b_fc": rnd(F, seed=1, dtype=dtype)}
    if proj:
        p.update(w_out=rnd(F, C, seed=2, dtype=dtype), b_out=rnd(C, seed=3, dtype=dtype))
    x = rnd(B, T, C, seed=4, dtype=dtype)
    yk, ck = K.feedforward_forward(x, p, act, drop, np.random.default_rng(2))
    yr, cr = R.feedforward_forward(x, p, act, drop, np.random.default_rng(2))
    close(yk, yr, dtype)
    if proj:  # the cache holds the activation, or not
        assert (ck[3][0] is None) == recompute
    d = rnd(B, T, C, seed=5, dtype=dtype)
    dxk, gk = K.feedforward_backward(d, ck)
    dxr, gr = R.feedforward_backward(d, cr)
    close(dxk, dxr, dtype)
    for k in gr:
        close(gk[k], gr[k], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_kernel_equals_reference(dtype):
    z = rnd(B, T, 11, dtype=dtype) * 4
    y = np.random.default_rng(1).integers(0, 11, (B, T))
    lk, dk = K.cross_entropy(z, y)
    lr, dr = R.cross_entropy(z, y)
    assert abs(lk - lr) < (1e-5 if dtype == np.float32 else 1e-13)
    close(dk, dr, dtype)
    assert dk.dtype == dtype
    assert K.cross_entropy(z, y, want_grad=False) == (lk, None)
    big = np.array([[1e4, 0.0, -1e4]], dtype=dtype)
    lk, dk = K.cross_entropy(big, np.array([1]))
    assert np.isfinite(lk) and np.all(np.isfinite(dk))


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_kernel_equals_reference(dtype):
    def make():
        return {"w": rnd(5, 4, dtype=dtype), "b": rnd(4, seed=1, dtype=dtype)}
    pk, pr = make(), make()
    ok = AdamW(pk, lr=0.01, weight_decay=0.1, use_kernels=True)
    orf = AdamW(pr, lr=0.01, weight_decay=0.1, use_kernels=False)
    for s in range(5):
        g = {"w": rnd(5, 4, seed=10 + s, dtype=dtype), "b": rnd(4, seed=20 + s, dtype=dtype)}
        ok.step(g)
        orf.step(g)
    for k in pk:
        close(pk[k], pr[k], dtype)
        close(ok.m[k], orf.m[k], dtype)
        close(ok.v[k], orf.v[k], dtype)


# ---- the kernels' backward passes against finite differences, on their own ----

def test_kernel_attention_grad(attention_path):
    p = {n: rnd(C, C, seed=i) for i, n in enumerate(["w_q", "w_k", "w_v", "w_proj"])}
    p["b_proj"] = rnd(C, seed=9)

    def fwd(x, **q):
        return K.multihead_forward(x, q, 3, 0.25, 0.1, np.random.default_rng(4))

    def bwd(d, c):
        dx, g = K.multihead_backward(d, c)
        return {"x": dx, **g}
    errors = check_layer(fwd, bwd, {"x": rnd(2, 5, C, seed=8), **p})
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("recompute", [False, True])
def test_kernel_layernorm_and_feedforward_grad(act, recompute, monkeypatch):
    import numgpt.kernels.ops
    monkeypatch.setattr(numgpt.kernels.ops, "RECOMPUTE_BYTES", -1 if recompute else 1 << 40)
    x = rnd(2, 5, C) * 2
    errors = check_layer(lambda x, g, b: K.layernorm_forward(x, g, b),
                         lambda d, c: dict(zip("xgb", K.layernorm_backward(d, c))),
                         {"x": x, "g": rnd(C, seed=1), "b": rnd(C, seed=2)})
    assert max(errors.values()) < 1e-6, errors
    p = {"w_fc": rnd(C, 16, seed=3), "b_fc": rnd(16, seed=4), "w_out": rnd(16, C, seed=5),
         "b_out": rnd(C, seed=6)}

    def bwd(d, c):
        dx, g = K.feedforward_backward(d, c)
        return {"x": dx, **g}
    errors = check_layer(lambda x, **q: K.feedforward_forward(x, q, act, 0.0, None), bwd,
                         {"x": x, **p})
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("preset", ["bigram", "single_head", "ffn", "layernorm", "preln", "scaled"])
def test_model_with_kernels_equals_reference(preset, attention_path, monkeypatch):
    """(For the scaled preset, with dropout, the feed-forward activations are recomputed in the
    backward, as at batch 64.)"""
    import numgpt.kernels.ops
    if preset == "scaled":
        monkeypatch.setattr(numgpt.kernels.ops, "RECOMPUTE_BYTES", -1)
    over = dict(block_size=16, n_embd=24, n_head=3, n_layer=2) if preset != "bigram" else {}
    if preset in ("single_head", "ffn"):
        over.update(n_head=1 if preset == "single_head" else 4, n_layer=1)
    mk = numgpt.build_model(preset, seed=2, kernels=True, zero_head=False, **over)
    mr = numgpt.build_model(preset, seed=2, kernels=False, zero_head=False, **over)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 65, (4, mk.cfg.block_size))
    y = rng.integers(0, 65, (4, mk.cfg.block_size))
    lk, gk = mk.loss_and_grads(x, y, rng=np.random.default_rng(5))
    lr, gr = mr.loss_and_grads(x, y, rng=np.random.default_rng(5))
    assert abs(lk - lr) < 1e-5
    for k in gr:
        np.testing.assert_allclose(gk[k], gr[k], rtol=1e-3, atol=2e-5, err_msg=k)
    assert abs(mk.loss(x, y) - mr.loss(x, y)) < 1e-5


def test_kernels_ignore_garbage_in_their_output_buffers():
    """The ops hand the kernels np.empty buffers: whatever those hold (here NaN) must not leak in.
    (A typed zero once came from y[0, 0] * 0, and reused memory made whole losses NaN.)"""
    from numgpt.kernels.activations import bias_act_bwd, bias_act_fwd
    from numgpt.kernels.embedding import embed_bwd
    from numgpt.kernels.layernorm import layernorm_bwd, layernorm_fwd
    for dt in DTYPES:
        x = rnd(6, C, dtype=dt)
        g, b = np.ones(C, dt), np.zeros(C, dt)
        y, mean, rstd = (np.full(s, np.nan, dt) for s in ((6, C), 6, 6))
        for f in (layernorm_fwd, layernorm_fwd.serial):
            f(x, g, b, dt(1e-5), y, mean, rstd)
            assert np.all(np.isfinite(y))
        dx, dg, db = np.full((6, C), np.nan, dt), np.full((2, C), np.nan, dt), np.full((2, C), np.nan, dt)
        for f in (layernorm_bwd, layernorm_bwd.serial):
            f(x, x, g, mean, rstd, 2, dx, dg, db)
            assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dg)) and np.all(np.isfinite(db))
        h, a = x.copy(), np.full((6, C), np.nan, dt)
        for f in (bias_act_fwd, bias_act_fwd.serial):
            f(h, b, 0, a)
            assert np.all(np.isfinite(a))
        dh = np.full((6, C), np.nan, dt)
        for f in (bias_act_bwd, bias_act_bwd.serial):
            f(x, h, 0, 2, dh, db)
            assert np.all(np.isfinite(dh)) and np.all(np.isfinite(db))
        dW, dP = np.full((5, C), np.nan, dt), np.full((4, C), np.nan, dt)
        for f in (embed_bwd, embed_bwd.serial):
            f(np.zeros((2, 3), np.int64), rnd(2, 3, C, dtype=dt), dW, dP)
            assert np.all(np.isfinite(dW)) and np.all(np.isfinite(dP))


@pytest.mark.parametrize("preset,over", [("preln", {}), ("layernorm", {"activation": "gelu"}),
                                         ("ffn", {}), ("single_head", {}),
                                         ("residual", {"ffn_mult": 2.0}),
                                         ("preln", {"n_embd": 256, "n_head": 4})])
@pytest.mark.parametrize("layout", ["by_input", "by_output", "by_output_threads", "by_input_threads",
                                    None])
def test_decode_kernel_equals_reference_step(preset, over, layout):
    """kernels/decode.py (one token through the whole model) against model.forward with the cache,
    float32, in every weight layout, and in the one measured fastest here (None)."""
    from numgpt.generate import KVCache
    from numgpt.kernels import decode
    m = numgpt.build_model(preset, seed=3, zero_head=False, kernels=True, block_size=10, **over)
    rng = np.random.default_rng(1)
    m.set_params({k: v + 0.2 * rng.standard_normal(v.shape).astype(np.float32)
                  for k, v in m.params.items()})
    idx = rng.integers(0, 65, (3, 10))
    ref, fast = KVCache(m, 3), KVCache(m, 3)
    fast.layout = None if layout is None else getattr(decode, layout.upper())
    m.forward(idx[:, :4], kv=ref)
    m.forward(idx[:, :4], kv=fast)
    for t in range(4, 10):
        want = m.forward(idx[:, t:t + 1], kv=ref)[0][:, 0]
        got = fast.step(m, idx[:, t])
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    np.testing.assert_allclose(fast.K, ref.K, rtol=1e-4, atol=1e-4 * np.abs(ref.K).max())
    if layout is not None:
        assert fast._layout == getattr(decode, layout.upper())  # the one tested


@pytest.mark.parametrize("preset,over", [("preln", {}), ("layernorm", {"activation": "gelu"}),
                                         ("ffn", {}), ("single_head", {}), ("residual", {}),
                                         ("scaled", {"attn_proj": False, "ffn_proj": False,
                                                     "ffn_mult": 1.0})])
def test_prefill_equals_the_reference_forward(preset, over):
    """kernels/step.py's prefill (a whole context through the fused step's forward, filling the
    key/value cache) against model.forward with the cache, float64, for every block structure
    (no norm, post-norm, pre-norm, without projections; dropout set: not done in either), two
    sequences, a context shorter than the block, then a refill over an older cache."""
    from numgpt.generate import KVCache
    m = numgpt.build_model(preset, seed=3, zero_head=False, kernels=True, dtype=np.float64,
                           block_size=10, n_layer=2, **over)
    idx = np.random.default_rng(1).integers(0, 65, (2, 10))
    ref, fast = KVCache(m, 2), KVCache(m, 2)
    for n in (7, 3):   # the second fills over the first's keys and values, as a rebuild does
        ref.t = 0
        want = m.forward(idx[:, -n:], kv=ref)[0][:, -1]
        got = fast.prefill(m, idx[:, -n:])
        assert fast._step_params is not None and fast.t == ref.t == n  # the compiled path ran
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fast.K[:, :, :, :n], ref.K[:, :, :, :n], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(fast.V[:, :, :, :n], ref.V[:, :, :, :n], rtol=1e-10, atol=1e-12)
    # and decoding goes on from the compiled prefill as from the reference's
    np.testing.assert_allclose(fast.step(m, idx[:, 0]), m.forward(idx[:, :1], kv=ref)[0][:, 0],
                               rtol=1e-10, atol=1e-12)
    # what the compiled code would read or write outside its arrays is refused
    for bad in (np.zeros((2, 11), dtype=int), np.zeros((3, 4), dtype=int),
                np.full((2, 4), 65), np.zeros((2, 0), dtype=int)):
        with pytest.raises(ValueError):
            fast.prefill(m, bad)


PREFILL_MEMORY = """
import sys, numpy as np, numgpt
from numgpt.generate import KVCache
from numgpt.parallel import compiled_forward_applies
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
cfg = numgpt.get_config("preln", n_layer=16, n_head=8, n_embd=32, block_size=512)
m = numgpt.GPT(cfg, seed=0)
assert compiled_forward_applies(cfg)
kv = KVCache(m, 1)
ids = np.zeros((1, 512), dtype=np.int64)
kv.prefill(m, ids[:, :8])             # the compiled code loaded (or compiled) first
assert kv._step_params is not None    # the compiled path, not model.forward
rss = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                  # the peak (VmHWM) starts again from the resident size
except OSError:
    print("unresettable")
    sys.exit(0)
kv.prefill(m, ids)
print(status("VmHWM") - rss)
"""


def test_prefill_holds_one_layers_intermediates_at_a_time():
    """The compiled prefill needs about one layer's attention probabilities at its peak, as
    model.forward with a cache does and numgpt.resources.sampling_bytes counts, not every
    layer's (what the training step keeps for its backward). Peak resident memory of a whole
    512-position context through 16 layers of 8 heads, in a fresh process (whose malloc hands
    freed memory back): one layer's probabilities are 8 MiB, all sixteen 128 MiB."""
    import os
    import subprocess
    import sys
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")
    r = subprocess.run([sys.executable, "-c", PREFILL_MEMORY], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if r.stdout.split()[-1] == "unresettable":
        pytest.skip("/proc/self/clear_refs cannot be written here")
    grew = int(r.stdout.split()[-1])
    one_layer = 8 * 512 * 512 * 4
    assert grew < 3 * one_layer, f"the prefill's peak grew {grew / 2**20:.0f} MiB"


def test_decode_layouts_agree_bit_for_bit():
    """The by-output layout on numba's threads and on the calling thread give the same logits,
    bit for bit: each output is one thread's dot product either way, and each head's attention
    one thread's (dealt out to the threads in the threaded layout, in turn on the calling
    thread in the other)."""
    from numgpt.kernels import decode
    from numgpt.generate import KVCache
    m = numgpt.build_model("preln", seed=3, zero_head=False, n_embd=256, n_head=4, block_size=10)
    idx = np.random.default_rng(1).integers(0, 65, (2, 10))
    out = []
    for layout in (decode.BY_OUTPUT_THREADS, decode.BY_OUTPUT):
        kv = KVCache(m, 2)
        kv.layout = layout
        m.forward(idx[:, :4], kv=kv)
        out.append([kv.step(m, idx[:, t]) for t in range(4, 10)])
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


def test_the_decoders_layout_is_measured_once_and_cached(monkeypatch, tmp_path):
    """The first compiled decode step times the layouts that can run here (in turns, on real
    steps: the logits are the chosen layout's) and caches the fastest for this machine, model
    shape and batch; the next cache of that shape reads it. No real time is asserted: the
    measured times are replaced."""
    from numgpt import generate, parallel
    from numgpt.kernels import _jit, decode
    monkeypatch.setattr(parallel, "_choices_path",
                        lambda kernels=True: str(tmp_path / "choices.json"))
    monkeypatch.setattr(generate, "_CHOSEN", {})  # nothing chosen yet in this process
    real = generate.measure_layouts
    seen = []

    def fake(model, kv, ids, logits, names, clock=None):
        seen.append(list(names))
        times, args = real(model, kv, ids, logits, names)
        return {n: {"by_output": 1.0}.get(n, 2.0) for n in times}, args
    monkeypatch.setattr(generate, "measure_layouts", fake)
    m = numgpt.build_model("preln", seed=3, zero_head=False, block_size=10)
    idx = np.random.default_rng(1).integers(0, 65, (2, 10))
    ref = generate.KVCache(m, 2)
    ref.layout = decode.BY_OUTPUT
    m.forward(idx[:, :4], kv=ref)
    want = [ref.step(m, idx[:, t]) for t in range(4, 7)]
    for _ in range(2):
        kv = generate.KVCache(m, 2)
        m.forward(idx[:, :4], kv=kv)
        got = [kv.step(m, idx[:, t]) for t in range(4, 7)]
        assert kv._layout == decode.BY_OUTPUT
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    assert seen == [generate.layout_candidates()]  # measured once, then read from the cache
    generate._CHOSEN.clear()  # a new process: the cache file's choice
    kv = generate.KVCache(m, 2)
    m.forward(idx[:, :4], kv=kv)
    kv.step(m, idx[:, 4])
    assert kv._layout == decode.BY_OUTPUT and len(seen) == 1
    assert ("by_output_threads" in seen[0]) == _jit.threads_allowed()
    kv = generate.KVCache(m, 3)  # another batch: measured again
    m.forward(idx[:1].repeat(3, 0)[:, :4], kv=kv)
    kv.step(m, np.array([1, 2, 3]))
    assert len(seen) == 2
    monkeypatch.setattr(_jit, "FORCE_SERIAL", True)  # no threads for the kernels: not a candidate
    assert "by_output_threads" not in generate.layout_candidates()


def test_split_batched_products_equal_numpy(monkeypatch, tmp_path):
    """kernels/ops._bmm computes a stack of per-head products whole (BLAS's threads) or dealt out
    to threads with one BLAS thread each: both ways give np.matmul's products, into a fresh
    array or a strided view. Which way a kind of stack takes is timed once, on scratch, and
    cached for the machine: every call of that kind gives the same bits."""
    import numgpt.kernels.ops as kops
    from numgpt import parallel
    from threadpoolctl import threadpool_info
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    monkeypatch.setattr(parallel, "_choices_path",
                        lambda kernels=True: str(tmp_path / "choices.json"))
    monkeypatch.setattr(kops, "_BMM", [])  # this test's own pool
    monkeypatch.setattr(kops, "BMM_WAYS", {})  # nothing chosen yet in this process
    seen = []
    real_job = kops._bmm_job

    def spy(a, b, out):  # which thread, and how many BLAS threads, each piece ran with
        import threading
        seen.append((threading.current_thread().name,
                     [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]))
        real_job(a, b, out)
    monkeypatch.setattr(kops, "_bmm_job", spy)
    for dtype in DTYPES:
        for a, b in ((rnd(5, 3, 7, 4, dtype=dtype), rnd(5, 3, 4, 6, seed=1, dtype=dtype)),
                     (rnd(4, 6, 256, 64, dtype=dtype), rnd(4, 6, 64, 256, seed=1, dtype=dtype))):
            want = np.matmul(a, b)
            for way in (kops._bmm_whole, kops._bmm_split):
                host = np.zeros(want.shape[:1] + want.shape[2:3] + want.shape[1:2]
                                + (want.shape[3] + 3,), dtype=dtype)
                view = host[..., 2:-1].transpose(0, 2, 1, 3)
                way(a, b, view, 2)
                close(view, want, dtype)
                assert not host[..., :2].any() and not host[..., -1:].any()
            first = kops._bmm(a, b)
            close(first, want, dtype)
            for _ in range(3):
                np.testing.assert_array_equal(kops._bmm(a, b), first)
    assert seen and all(name.startswith("numgpt-bmm") and set(n) == {1} for name, n in seen)
    chosen = dict(kops.BMM_WAYS)
    assert len(chosen) == 4 and set(chosen.values()) <= {kops._bmm_whole, kops._bmm_split}
    kops.BMM_WAYS.clear()  # a new process: the cached choices, nothing timed
    timer = parallel.time_in_turns
    monkeypatch.setattr(parallel, "time_in_turns", None)
    for dtype in DTYPES:
        kops._bmm(rnd(5, 3, 7, 4, dtype=dtype), rnd(5, 3, 4, 6, seed=1, dtype=dtype))
        kops._bmm(rnd(4, 6, 256, 64, dtype=dtype), rnd(4, 6, 64, 256, seed=1, dtype=dtype))
    assert kops.BMM_WAYS == chosen
    monkeypatch.setattr(parallel, "time_in_turns", timer)
    # and the whole attention layer through it still equals the reference
    p = {n: rnd(C, C, seed=i) * 0.5 for i, n in enumerate(["w_q", "w_k", "w_v"])}
    x = rnd(B, T, C, seed=7)
    yk, ck = K.multihead_forward(x, p, 3, 0.2, 0.0, np.random.default_rng(1))
    yr, cr = R.multihead_forward(x, p, 3, 0.2, 0.0, np.random.default_rng(1))
    close(yk, yr, np.float64)
    d = rnd(B, T, C, seed=8)
    dxk, gk = K.multihead_backward(d, ck)
    dxr, gr = R.multihead_backward(d, cr)
    close(dxk, dxr, np.float64)
    for k in gr:
        close(gk[k], gr[k], np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_on_column_slices_equals_matmul(dtype):
    """kernels/blas.gemm: C = op(A) op(B) + beta C straight on column slices of wider arrays (the
    heads of a packed q, k, v), every transpose, into a strided output whose neighbours stay
    untouched; beta 0 ignores NaN in C, and an empty inner dimension gives zeros."""
    from numgpt.kernels.blas import gemm
    rng = np.random.default_rng(0)
    host = rng.standard_normal((9, 40)).astype(dtype)
    for ta in (False, True):
        for tb in (False, True):
            A = host[:5, 11:20] if ta else host[:, 3:8]      # op(A) is [9, 5]
            B = host[:7, 27:32] if tb else host[:5, 20:27]   # op(B) is [5, 7]
            want = (A.T if ta else A) @ (B.T if tb else B)
            out = np.full((12, 30), 7.0, dtype=dtype)
            C = out[2:11, 4:11]
            C[:] = np.nan
            gemm(A, ta, B, tb, C, 0.0)
            close(C, want, dtype)
            assert (out[:2] == 7).all() and (out[11:] == 7).all()
            assert (out[:, :4] == 7).all() and (out[:, 11:] == 7).all()
            C[:] = 1.0
            gemm(A, ta, B, tb, C, 1.0)
            close(C, want + 1, dtype)
    for A, B in ((host[:1, :5], host[:5, 5:12]), (host[:, :1], host[:1, 5:12]),  # one row,
                 (host[:, :5], host[:5, 7:8]), (host[:0, :5], host[:5, 5:12])):    # column, none
        C = np.full((A.shape[0], B.shape[1]), np.nan, dtype=dtype)
        gemm(A, False, B, False, C, 0.0)
        close(C, A @ B, dtype)
    C = np.full((3, 4), 5.0, dtype=dtype)
    gemm(np.empty((3, 0), dtype), False, np.empty((0, 4), dtype), False, C, 0.0)
    assert (C == 0).all()
    with pytest.raises(ValueError, match="adjacent"):
        gemm(host[:, ::2][:, :5], False, host[:5, :7], False, np.empty((9, 7), dtype), 0.0)
    overlapping = np.lib.stride_tricks.as_strided(host, (3, 5), (host.itemsize, host.itemsize))
    with pytest.raises(ValueError, match="apart"):
        gemm(overlapping, False, host[:5, :7], False, np.empty((3, 7), dtype), 0.0)
    with pytest.raises(ValueError, match="shapes"):
        gemm(host[:, :5], False, host[:4, :7], False, np.empty((9, 7), dtype), 0.0)


def _splitmix64(state, n):
    """The first n outputs of SplitMix64 from state, in plain Python integers (an independent
    writing of the generator the dropout masks hash with)."""
    out, m = [], (1 << 64) - 1
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & m
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        out.append(z ^ (z >> 31))
    return out


def test_dropout_hash_is_splitmix64():
    """The masks' numbers are SplitMix64's outputs: its published first output from seed 0, and
    the reference's and both kernels' bits (serial and threaded builds) against a plain-Python
    SplitMix64 for another seed, at thresholds from keep-all to drop-all."""
    from numgpt.kernels.dropout import dropout_fill, keep_fill
    from numgpt.layers.dropout import hash_keep
    assert _splitmix64(0, 1)[0] == 0xE220A8397B1DCDAF
    seed = 0x1234_5678_9ABC_DEF0
    n = 300
    top = np.array([z >> 32 for z in _splitmix64(seed, n)], dtype=np.uint64)
    x = rnd(n, dtype=np.float32)
    for thr in (0, 1 << 31, 3 << 30, (1 << 32) - 1, 1 << 32):
        expect = top >= np.uint64(thr)
        np.testing.assert_array_equal(hash_keep(np.uint64(seed), np.uint64(thr), n), expect)
        for build in (keep_fill, keep_fill.serial):
            got = np.empty(n, dtype=bool)
            build(np.uint64(seed), np.uint64(thr), got)
            np.testing.assert_array_equal(got, expect)
        for build in (dropout_fill, dropout_fill.serial):
            y = np.empty_like(x)
            build(x, np.uint64(seed), np.uint64(thr), np.float32(2.0), y)
            np.testing.assert_array_equal(y, x * np.where(expect, 2.0, 0.0).astype(np.float32))
    got = np.empty(n, dtype=bool)  # a plain int seed gives the same bits (cast in the kernel)
    keep_fill.serial(seed, 1 << 31, got)
    np.testing.assert_array_equal(got, top >= np.uint64(1 << 31))


@pytest.mark.parametrize("shape", [(0,), (1,), (3, 5, 7), (2, 3, 64, 64), (5, 300, 17),
                                   ((1 << 20) + 7,)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_kernel_equals_reference(shape, p):
    """Bit for bit, from the same rng state: the threaded and the serial kernel against the
    reference (whose hashing goes in chunks of 2^20 elements)."""
    from numgpt.kernels.dropout import keep_fill
    from numgpt.layers.dropout import draw_seed, keep_mask, keep_threshold
    ref = keep_mask(np.random.default_rng(7), shape, p)
    assert ref.shape == shape and ref.dtype == bool
    for build in (keep_fill, keep_fill.serial):
        got = np.empty(shape, dtype=bool)
        build(draw_seed(np.random.default_rng(7), shape), keep_threshold(p), got.reshape(-1))
        np.testing.assert_array_equal(got, ref)


def test_dropout_masks_keep_one_minus_p_independently():
    """Kept fraction within 5 standard errors of 1 - p; successive masks from one rng differ, and
    neighbouring elements are uncorrelated (the hash mixes the counter)."""
    from numgpt.layers.dropout import keep_mask
    rng = np.random.default_rng(0)
    n = 200_000
    for p in (0.05, 0.2, 0.5, 0.9):
        m = keep_mask(rng, (n,), p)
        assert abs(m.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)
        a = m[:-1].astype(float) - m.mean()
        b = m[1:].astype(float) - m.mean()
        assert abs((a * b).mean() / m.var()) < 5 / np.sqrt(n)
    m1, m2 = keep_mask(rng, (1000,), 0.5), keep_mask(rng, (1000,), 0.5)
    assert 0.4 < (m1 != m2).mean() < 0.6
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="dropout probability"):
            keep_mask(rng, (3,), bad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_kernel_equals_reference(dtype, monkeypatch):
    """Forward and backward bit for bit; the kernels' cache is the seed, not the mask."""
    import numgpt.kernels._jit
    from numgpt.kernels.dropout import dropout_backward as kernel_backward
    from numgpt.kernels.dropout import dropout_forward as kernel_dropout
    from numgpt.layers.dropout import dropout_backward, dropout_forward
    for x in (rnd(4, 33, 20, dtype=dtype), rnd(4, 33, 20, dtype=dtype)[:, ::2].T,
              np.array(1.5, dtype=dtype)):
        dy = rnd(*x.shape, seed=9, dtype=dtype)
        yr, cr = dropout_forward(x, 0.3, np.random.default_rng(3))
        dxr = dropout_backward(dy, cr)
        for serial in (True, False):  # the serial kernel, then (where threads may run) threaded
            monkeypatch.setattr(numgpt.kernels._jit, "FORCE_SERIAL", serial)
            monkeypatch.setattr(numgpt.kernels._jit, "FORCE_THREADS", not serial)
            yk, ck = kernel_dropout(x, 0.3, np.random.default_rng(3))
            np.testing.assert_array_equal(yk, yr)
            assert yk.dtype == dtype and yk.shape == x.shape
            assert not any(isinstance(c, np.ndarray) for c in ck)  # no mask kept
            dxk = kernel_backward(dy, ck)
            np.testing.assert_array_equal(dxk, dxr)
            assert dxk.dtype == dtype and dxk.shape == x.shape
    y0, c0 = kernel_dropout(x, 0.0, None)
    assert y0 is x and c0 is None and kernel_backward(dy, None) is dy
    with pytest.raises(ValueError, match="rng"):
        kernel_dropout(x, 0.3, None)


@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_feedforward_recompute_is_bit_identical_and_repeatable(act, dtype, monkeypatch):
    """Recomputing the activation in the backward gives the same bits as keeping it, and a
    backward run twice on one cache gives the same result (the recompute rewrites h in place)."""
    import numgpt.kernels.ops
    p = {"w_fc": rnd(C, 20, dtype=dtype), "b_fc": rnd(20, seed=1, dtype=dtype),
         "w_out": rnd(20, C, seed=2, dtype=dtype), "b_out": rnd(C, seed=3, dtype=dtype)}
    x, d = rnd(B, T, C, seed=4, dtype=dtype), rnd(B, T, C, seed=5, dtype=dtype)
    out = {}
    for recompute in (False, True):
        monkeypatch.setattr(numgpt.kernels.ops, "RECOMPUTE_BYTES", -1 if recompute else 1 << 40)
        y, c = K.feedforward_forward(x, p, act, 0.2, np.random.default_rng(1))
        first, second = K.feedforward_backward(d, c), K.feedforward_backward(d, c)
        np.testing.assert_array_equal(first[0], second[0])
        for k in first[1]:
            np.testing.assert_array_equal(first[1][k], second[1][k])
        out[recompute] = (y, first)
    np.testing.assert_array_equal(out[True][0], out[False][0])
    np.testing.assert_array_equal(out[True][1][0], out[False][1][0])
    for k in out[False][1][1]:
        np.testing.assert_array_equal(out[True][1][1][k], out[False][1][1][k], err_msg=k)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_activation_kernel_keeps_nan_like_the_reference(act):
    """A NaN pre-activation must stay NaN (so that a NaN loss is seen), as in the reference."""
    p = {"w_fc": np.eye(C, dtype=np.float32), "b_fc": np.zeros(C, dtype=np.float32)}
    x = rnd(1, 2, C, dtype=np.float32)
    x[0, 0, 3] = np.nan
    x[0, 1, 5] = -1.0
    yk, _ = K.feedforward_forward(x, p, act, 0.0, None)
    yr, _ = R.feedforward_forward(x, p, act, 0.0, None)
    np.testing.assert_array_equal(np.isnan(yk), np.isnan(yr))
    assert np.isnan(yk[0, 0, 3])
    close(yk, yr, np.float32)


def test_threads_pay_from_a_measured_amount_of_work(monkeypatch, tmp_path):
    """kernels._jit.pick takes the threaded build from PARALLEL_MIN_WORK elements, which is not a
    fixed number but measured on the machine at the first pick that could thread (a product and
    a LayerNorm, each build in turns, until threads win at WON_IN_A_ROW sizes in a row) and
    cached beside the step choices; a new process reads the cache. No real time is asserted."""
    from numgpt import parallel
    from numgpt.kernels import _jit
    from numgpt.kernels.layernorm import layernorm_fwd
    # the rule: the least size from which threads won at every larger size measured
    assert _jit.min_work_from({1: (1, 2), 2: (2, 1), 4: (2, 3), 8: (4, 3), 16: (8, 5)}) == "8"
    assert _jit.min_work_from({1: (1, 2), 2: (2, 3)}) == "never"
    assert _jit.min_work_from({1: (2, 1), 2: (3, 2)}) == "1"
    times = _jit.measure_min_work()  # a real measurement: its shape, not its figures
    sizes = list(times)
    assert sizes == _jit.MIN_WORK_SIZES[:len(sizes)] and all(
        len(t) == 2 and min(t) > 0 for t in times.values())
    if len(sizes) < len(_jit.MIN_WORK_SIZES):  # stopped early: threads won the last sizes
        assert all(times[n][1] < times[n][0] for n in sizes[-_jit.WON_IN_A_ROW:])
    monkeypatch.setattr(parallel, "_choices_path",
                        lambda kernels=True: str(tmp_path / "choices.json"))
    monkeypatch.setattr(_jit, "PARALLEL_MIN_WORK", None)
    measured = []

    def fake():
        measured.append(1)
        return {1024: (1.0, 2.0), 2048: (2.0, 1.0), 4096: (4.0, 1.0)}
    monkeypatch.setattr(_jit, "measure_min_work", fake)
    if not _jit.threads_allowed():
        assert _jit.pick(layernorm_fwd, 1 << 30) is layernorm_fwd.serial and not measured
        return
    assert _jit.pick(layernorm_fwd, 2047) is layernorm_fwd.serial
    assert _jit.pick(layernorm_fwd, 2048) is layernorm_fwd and measured == [1]
    monkeypatch.setattr(_jit, "PARALLEL_MIN_WORK", None)  # a new process: the cached size
    assert _jit.pick(layernorm_fwd, 2048) is layernorm_fwd and measured == [1]
    assert _jit.PARALLEL_MIN_WORK == 2048
    monkeypatch.setattr(_jit, "FORCE_THREADS", True)
    assert _jit.pick(layernorm_fwd, 1) is layernorm_fwd
    monkeypatch.setattr(_jit, "FORCE_SERIAL", True)
    assert _jit.pick(layernorm_fwd, 1 << 30) is layernorm_fwd.serial


def test_the_one_blas_thread_step_keeps_stacked_products_whole(monkeypatch, tmp_path):
    """Under the one-BLAS-thread step kernels/ops._bmm neither measures nor splits (a choice made
    with BLAS limited to one thread would be cached for the plain step, whose BLAS has its own)."""
    import numgpt.kernels.ops as kops
    from numgpt import parallel
    from numgpt.config import get_config
    from numgpt.model import GPT
    monkeypatch.setattr(parallel, "_choices_path",
                        lambda kernels=True: str(tmp_path / "choices.json"))
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    monkeypatch.setattr(kops, "BMM_WAYS", {})
    cfg = get_config("laptop", n_embd=24, n_head=3, n_layer=1, block_size=16, vocab_size=11,
                     dropout=0.1, kernels=True)
    m = GPT(cfg)
    x = np.random.default_rng(0).integers(0, 11, (4, 16))
    want = m.loss_and_grads(x, x, rng=np.random.default_rng(1))[0]
    seen = dict(kops.BMM_WAYS)
    kops.BMM_WAYS.clear()
    got = parallel.OneBlasThreadStep(m)(x, x, rng=np.random.default_rng(1))[0]
    assert not kops.BMM_WAYS and abs(got - want) < 1e-5
    from numgpt.kernels import _jit
    assert _jit.ONE_BLAS_THREAD is False  # set only during the step
    assert seen or not _jit.threads_allowed()  # the plain path did measure


# array-making calls that numba turns into a parallel loop of their own inside a parallel function
_PARALLEL_LOOP_MAKERS = ("zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "arange")


def test_threaded_kernels_start_one_parallel_loop_a_call():
    """Inside a parallel=True kernel, numba runs array expressions outside its prange loop (a
    typed zero made as np.zeros(1)[0], a slice assignment) as parallel loops of their own, each
    waking the threads once more a call. Every threaded kernel keeps such work inside its one
    prange loop or in a serial caller (checked on the sources: a fresh compile to ask numba
    itself takes minutes)."""
    import ast
    import glob
    import os

    from numgpt.kernels import _jit
    found, offending = 0, []
    for path in sorted(glob.glob(os.path.join(_jit.HERE, "*.py"))):
        with open(path, encoding="utf-8") as f:
            src = f.read()
        for fn in ast.walk(ast.parse(src)):
            if not (isinstance(fn, ast.FunctionDef) and any(
                    "parallel=True" in ast.get_source_segment(src, d) for d in fn.decorator_list)):
                continue
            found += 1
            outside = [s for s in fn.body
                       if not (isinstance(s, ast.For) and "prange" in ast.unparse(s.iter))]
            for stmt in outside:
                for node in ast.walk(stmt):
                    makes = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                             and node.func.attr in _PARALLEL_LOOP_MAKERS)
                    slices = (isinstance(node, (ast.Assign, ast.AugAssign)) and any(
                        isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Slice)
                        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])))
                    if makes or slices:
                        offending.append(f"{os.path.basename(path)}:{node.lineno} {fn.name}")
    assert found >= 15  # every threaded kernel was read
    assert not offending, offending


def test_attention_recomputed_in_chunks_does_not_depend_on_the_chunk(monkeypatch, tmp_path):
    """Above STORE_PROBS_BYTES the backward computes the probabilities again, a chunk of
    sequences at a time. With the kernels serial (as in the sharded step's threads) the
    gradients are the same bits whatever the chunk, so the chunk measured fastest on a machine
    changes only the speed. Where the chunk is not forced it is measured once per kind of call
    and cached (beside the step choices)."""
    import numgpt.kernels.ops as ops
    from numgpt import parallel
    from numgpt.kernels import _jit
    monkeypatch.setattr(ops, "STORE_PROBS_BYTES", -1)
    monkeypatch.setattr(_jit, "FORCE_SERIAL", True)
    p = {n: rnd(C, C, seed=i, dtype=np.float32) for i, n in enumerate(["w_q", "w_k", "w_v"])}
    x = rnd(5, T, C, seed=7, dtype=np.float32)
    d = rnd(5, T, C, seed=8, dtype=np.float32)
    results = []
    for chunk in (1, 2, 3, 5):
        monkeypatch.setattr(ops, "_chunk_sequences", lambda *a, c=chunk: c)
        y, cache = K.multihead_forward(x, p, 3, 0.2, 0.0, np.random.default_rng(1))
        assert cache[3] is None and cache[4] == chunk  # not kept; the chunk the backward takes
        results.append((y, *K.multihead_backward(d, cache)))
    for y, dx, g in results[1:]:
        np.testing.assert_array_equal(y, results[0][0])
        np.testing.assert_array_equal(dx, results[0][1])
        for k in g:
            np.testing.assert_array_equal(g[k], results[0][2][k])
    monkeypatch.undo()
    monkeypatch.setattr(ops, "STORE_PROBS_BYTES", -1)
    monkeypatch.setattr(ops, "CHUNKS", {})
    monkeypatch.setattr(parallel, "_choices_path",
                        lambda kernels=True: str(tmp_path / "choices.json"))
    _, cache = K.multihead_forward(x, p, 3, 0.0, 0.0, None)
    assert cache[4] in (1, 2, 4) and len(ops.CHUNKS) == 1  # measured: 1, 2 or 4 of 5 a chunk
    assert "attention chunks" in (tmp_path / "choices.json").read_text()
