"""Data-parallel training steps (numgpt/parallel.py): the same loss and gradients as one pass over
the whole batch, reproducible dropout, and a resumed sharded run identical to an unbroken one."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import numgpt
from numgpt import parallel
from numgpt.parallel import ShardedStep


@pytest.mark.parametrize("B,shards", [(2, 2), (5, 2), (6, 2), (5, 3), (2, 4)])
def test_sharded_step_equals_the_whole_batch(B, shards):
    """Two shards (these machines' cores), and more (a bigger CPU's), uneven or more than rows."""
    cfg = numgpt.get_config("preln", vocab_size=20, batch_size=B)
    m = numgpt.GPT(cfg, seed=1, dtype=np.float64)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, (B, cfg.block_size))
    y = rng.integers(0, 20, (B, cfg.block_size))
    loss, grads = m.loss_and_grads(x, y, train=False)
    with ShardedStep(m, shards) as step:
        loss2, grads2 = step(x, y, train=False)
    assert abs(loss - loss2) < 1e-12
    for k in grads:
        np.testing.assert_allclose(grads2[k], grads[k], rtol=1e-10, atol=1e-13)


def test_sharded_dropout_is_reproducible_and_follows_the_rng():
    """Same generator, same step (to float32 rounding: see parallel.py); another, another step."""
    cfg = numgpt.get_config("preln", vocab_size=20, batch_size=4, dropout=0.3, zero_head=False)
    m = numgpt.GPT(cfg, seed=1)
    x = np.random.default_rng(0).integers(0, 20, (4, cfg.block_size))
    with ShardedStep(m, 2) as step:
        a = step(x, x, rng=np.random.default_rng(5))
        b = step(x, x, rng=np.random.default_rng(5))
        c = step(x, x, rng=np.random.default_rng(6))
    assert abs(a[0] - b[0]) < 1e-6 and abs(a[0] - c[0]) > 1e-4
    for k in a[1]:
        np.testing.assert_allclose(a[1][k], b[1][k], rtol=1e-5, atol=1e-8)


def test_the_sharded_step_takes_a_slice_per_core(monkeypatch):
    """One shard per core (parallel.cores), so a CPU with more cores than these machines' two
    uses them all; the memory estimate counts the same slices."""
    from numgpt import resources
    monkeypatch.setattr(parallel, "cores", lambda: 4)
    m = numgpt.GPT(numgpt.get_config("residual", vocab_size=20), seed=0)
    step, close = parallel.make_step("sharded", m)
    close()
    assert step.shards == 4
    cfg = numgpt.get_config("scaled", vocab_size=65, batch_size=64)
    assert resources._call_rows(cfg, "sharded") == 16 and resources._call_rows(cfg, "plain") == 64
    assert resources._threads_of(cfg.replace(batch_size=3), "sharded") == 3


def test_which_configs_may_be_sharded(monkeypatch):
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    for var in ("NUMGPT_FUSED", "NUMGPT_DATA_PARALLEL", "NUMGPT_STEP"):
        monkeypatch.delenv(var, raising=False)
    laptop = numgpt.get_config("laptop", dropout=0.1)
    assert parallel.candidates(laptop) == ["sharded", "one_blas", "plain"]
    assert "sharded" not in parallel.candidates(laptop.replace(kernels=False))
    assert "sharded" not in parallel.candidates(laptop.replace(batch_size=1))
    assert "sharded" not in parallel.candidates(numgpt.get_config("bigram"))
    monkeypatch.setenv("NUMGPT_DATA_PARALLEL", "0")
    assert "sharded" not in parallel.candidates(laptop)
    monkeypatch.delenv("NUMGPT_DATA_PARALLEL")
    monkeypatch.setattr(parallel, "cores", lambda: 1)
    assert parallel.candidates(laptop) == ["plain"]


def test_the_attention_path_is_a_candidate_where_lanes_may_win(monkeypatch):
    """The fused step's two attention paths are measured against each other (and the other
    steps) where block x head size^2 <= LANES_CANDIDATE_MAX; beyond, only BLAS."""
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    for var in ("NUMGPT_FUSED", "NUMGPT_DATA_PARALLEL", "NUMGPT_STEP"):
        monkeypatch.delenv(var, raising=False)
    tiny = numgpt.get_config("residual")            # T 8, heads of 8
    laptop = numgpt.get_config("laptop")            # T 64, heads of 32
    assert parallel.candidates(tiny)[:2] == ["fused_lanes", "fused"]
    assert parallel.candidates(laptop)[0] == "fused" and "fused_lanes" not in parallel.candidates(
        laptop)
    assert parallel.lanes_may_win(laptop.replace(block_size=16))  # 16 x 32^2 = 2^14
    assert not parallel.lanes_may_win(laptop.replace(block_size=17))
    monkeypatch.setenv("NUMGPT_STEP", "fused_lanes")
    assert parallel.candidates(laptop) == ["fused_lanes"]  # forced: measured nowhere, still runs
    monkeypatch.setenv("NUMGPT_FUSED", "0")
    monkeypatch.delenv("NUMGPT_STEP")
    assert not {"fused", "fused_lanes"} & set(parallel.candidates(tiny))


def test_lanes_win_where_measured_faster(monkeypatch, tmp_path):
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    for var in ("NUMGPT_FUSED", "NUMGPT_DATA_PARALLEL", "NUMGPT_STEP"):
        monkeypatch.delenv(var, raising=False)
    cfg = numgpt.get_config("residual")
    for lanes_ms, best in ((0.5, "fused_lanes"), (0.9, "fused")):
        monkeypatch.setattr(parallel, "_choices_path",
                            lambda kernels=True: str(tmp_path / f"{best}.json"))
        fake = FakeSteps(monkeypatch, {"fused_lanes": lanes_ms * 1e-3, "fused": 0.8e-3,
                                       "sharded": 2e-3, "one_blas": 3e-3, "plain": 4e-3})
        assert parallel.choose_step(None, cfg, clock=fake.clock) == best


class FakeSteps:
    """Stand-ins for the steps, each 'taking' its seconds on a fake clock (a number, or a list:
    the seconds of its first, second, ... call, the last repeated)."""

    def __init__(self, monkeypatch, seconds):
        self.now, self.calls = 0.0, []
        self.closed, self.models = [], []

        def make(name, model):
            self.models.append(model)
            def step(x, y, train=True, rng=None):
                t = seconds[name]
                if isinstance(t, list):
                    t = t[min(self.calls.count(name), len(t) - 1)]
                self.calls.append(name)
                self.now += t
                return 0.0, {}
            return step, (lambda: self.closed.append(name))
        monkeypatch.setattr(parallel, "make_step", make)

    def clock(self):
        return self.now


def test_the_fastest_step_is_chosen_by_measurement_and_cached(monkeypatch, tmp_path):
    """choose_step times every candidate in turns and takes the fastest; the choice is cached for
    this machine, model shape and dtype (the next run measures nothing), and a resumed run keeps
    the step it trained with. Times come from a fake clock: no real time is asserted."""
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    for var in ("NUMGPT_FUSED", "NUMGPT_DATA_PARALLEL", "NUMGPT_STEP"):
        monkeypatch.delenv(var, raising=False)
    path = str(tmp_path / "choices.json")
    monkeypatch.setattr(parallel, "_choices_path", lambda kernels=True: path)
    cfg = numgpt.get_config("residual")
    fake = FakeSteps(monkeypatch, {"fused_lanes": 0.35, "fused": 0.4, "sharded": 0.3,
                                   "one_blas": 2.0, "plain": 0.5})
    said = []
    assert parallel.choose_step(None, cfg, say=said.append, clock=fake.clock) == "sharded"
    assert said[-1].startswith("step: sharded, the fastest measured here (sharded 300 ms, "
                               "fused_lanes 350 ms, fused 400")
    assert len(said) == 1
    assert fake.calls[:5] == ["fused_lanes", "fused", "sharded", "one_blas", "plain"]  # warm-ups
    assert fake.calls[5] == "one_blas"  # a long warm-up 6x the quickest is repeated, and again:
    assert "one_blas" not in fake.calls[6:]  # out before the turns
    assert sorted(fake.closed) == sorted(parallel.STEPS)
    n = len(fake.calls)
    assert parallel.planned_step(cfg) == "sharded"
    assert parallel.choose_step(None, cfg, say=said.append, clock=fake.clock) == "sharded"
    assert len(fake.calls) == n and "cached" in said[-1]
    assert parallel.planned_step(cfg.replace(batch_size=16)) is None  # another shape measures
    assert parallel.planned_step(cfg, dtype=np.float64) is None  # and a float64 model
    assert parallel.choose_step(None, cfg, prefer="plain", say=said.append) == "plain"
    assert "this run trained with" in said[-1]
    # short warm-ups say little (first calls cost extra): all take turns
    fake2 = FakeSteps(monkeypatch, {"fused_lanes": 0.0035, "fused": 0.004, "sharded": 0.003,
                                    "one_blas": 0.02, "plain": 0.005})
    parallel.choose_step(None, cfg.replace(batch_size=16), clock=fake2.clock)
    assert "one_blas" in fake2.calls[5:]
    monkeypatch.setenv("NUMGPT_STEP", "one_blas")
    assert parallel.choose_step(None, cfg, say=said.append, clock=fake.clock) == "one_blas"
    assert len(fake.calls) == n and said[-1] == "step: one_blas (NUMGPT_STEP)"


def test_the_numpy_layers_step_is_cached_too(monkeypatch, tmp_path):
    """With the kernels off (one_blas or plain, the NumPy layers) the choice is measured once and
    cached as well, in a file of its own that is found without loading the kernels."""
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    monkeypatch.delenv("NUMGPT_STEP", raising=False)
    monkeypatch.setattr(parallel, "_choices_path",
                        lambda kernels=True: str(tmp_path / f"kernels-{kernels}.json"))
    cfg = numgpt.get_config("residual", kernels=False)
    fake = FakeSteps(monkeypatch, {"one_blas": 0.3, "plain": 0.2})
    said = []
    assert parallel.choose_step(None, cfg, say=said.append, clock=fake.clock) == "plain"
    n = len(fake.calls)
    assert parallel.planned_step(cfg) == "plain"
    assert parallel.choose_step(None, cfg, say=said.append, clock=fake.clock) == "plain"
    assert len(fake.calls) == n and "cached" in said[-1]
    assert os.listdir(tmp_path) == ["kernels-False.json"]
    # changed NumPy layers (numgpt's sources) are measured again
    monkeypatch.setattr(parallel, "_sources_stamp", lambda: "other sources")
    assert parallel.planned_step(cfg) is None


def test_the_numpy_layers_choices_file_is_found_without_the_kernels():
    """The file is in the folder of the kernels' caches, found without importing them."""
    code = ("import os, sys\nfrom numgpt import parallel\n"
            "p = parallel._choices_path(kernels=False)\nprint(os.path.basename(p))\n"
            "print('numgpt.kernels' in sys.modules, 'numba' in sys.modules)\n"
            "from numgpt.kernels import _jit\nprint(os.path.dirname(p) == _jit.CACHE_BASE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[:3] == ["numpy-step-choices.json", "False False", "True"]


def test_long_steps_are_timed_three_times_each(monkeypatch, tmp_path):
    """A step longer than the whole measurement's time still gets MIN_ROUNDS timings, and the
    median decides: one slow spell (the second call of sharded, here) does not."""
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    for var in ("NUMGPT_FUSED", "NUMGPT_DATA_PARALLEL", "NUMGPT_STEP"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(parallel, "_choices_path",
                        lambda kernels=True: str(tmp_path / "choices.json"))
    cfg = numgpt.get_config("residual", dropout=0.1)  # sharded, one_blas, plain
    fake = FakeSteps(monkeypatch, {"sharded": [1.4, 1.2, 0.85], "one_blas": 1.7,
                                   "plain": [1.5, 0.96]})  # not a close call (CLOSE_FACTOR)
    said = []
    assert parallel.choose_step(None, cfg, say=said.append, clock=fake.clock) == "sharded"
    assert fake.calls.count("sharded") == fake.calls.count("plain") == 1 + parallel.MIN_ROUNDS
    assert said[-1].startswith("step: sharded, the fastest measured here (sharded 850 ms, "
                               "plain 960 ms")
    # steps this long are announced before their rounds (short ones are not: the test above)
    assert len(said) == 2 and said[0].startswith(
        "step: timing sharded, one_blas, plain, a few steps each, to train on the fastest "
        "(their first took 1.4, 1.7, 1.5 s;")


def test_long_steps_are_timed_on_fewer_layers(monkeypatch, tmp_path):
    """Where n_layer times one layer's plain step is over LONG_STEP_SECONDS, the candidates are
    timed on a model of the same shapes cut to as many layers as fit in it, and the result line
    says so; shorter steps are timed on the model itself."""
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    for var in ("NUMGPT_FUSED", "NUMGPT_DATA_PARALLEL", "NUMGPT_STEP"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(parallel, "_choices_path",
                        lambda kernels=True: str(tmp_path / "choices.json"))
    cfg = numgpt.get_config("residual", dropout=0.1, n_layer=6)  # sharded, one_blas, plain
    m = numgpt.GPT(cfg, seed=0)
    fake = FakeSteps(monkeypatch, {"sharded": 0.3, "one_blas": 0.5, "plain": 0.4})
    one_layer = []

    def layer_step(self, x, y, train=True, rng=None):  # one layer's plain step: 0.1 s a layer
        one_layer.append(self.cfg.n_layer)
        fake.now += 0.1 * self.cfg.n_layer
        return 0.0, {}
    monkeypatch.setattr(numgpt.GPT, "loss_and_grads", layer_step)
    said = []
    assert parallel.choose_step(m, cfg, say=said.append, clock=fake.clock) == "sharded"
    assert one_layer == [1, 1]  # an untimed call, then a timed one
    assert {mm.cfg.n_layer for mm in fake.models} == {2} and m not in fake.models  # 0.25 / 0.1
    assert said[-1].startswith("step: sharded, the fastest measured here (on 2 of the model's 6 "
                               "layers: sharded 300 ms, plain 400 ms")
    # 6 x 0.04 s is not long: the model itself is timed
    fake2 = FakeSteps(monkeypatch, {"sharded": 0.3, "one_blas": 0.5, "plain": 0.4})
    monkeypatch.setattr(numgpt.GPT, "loss_and_grads",
                        lambda self, *a, **k: setattr(fake2, "now", fake2.now + 0.04) or (0., {}))
    parallel.choose_step(m, cfg.replace(batch_size=16), say=said.append, clock=fake2.clock)
    assert fake2.models and all(mm is m for mm in fake2.models)
    assert said[-1].startswith("step: sharded, the fastest measured here (sharded 300 ms")


def test_a_close_call_is_timed_again(monkeypatch, tmp_path):
    """Where the two best steps end within CLOSE_FACTOR, those two take turns again and the
    median over both measurements decides: here sharded's first three steps are a slow spell."""
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    for var in ("NUMGPT_FUSED", "NUMGPT_DATA_PARALLEL", "NUMGPT_STEP"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(parallel, "_choices_path",
                        lambda kernels=True: str(tmp_path / "choices.json"))
    cfg = numgpt.get_config("residual", dropout=0.1)  # sharded, one_blas, plain
    fake = FakeSteps(monkeypatch, {"sharded": [1.5, 1.1, 1.1, 1.1, 0.8], "one_blas": 3.0,
                                   "plain": [1.5, 1.0]})
    assert parallel.choose_step(None, cfg, clock=fake.clock) == "sharded"
    n = parallel.MIN_ROUNDS
    assert fake.calls.count("sharded") == fake.calls.count("plain") == 1 + 2 * n
    assert fake.calls.count("one_blas") == 2  # its warm-up and one round: far behind, out
    # a clear lead is not timed again
    fake2 = FakeSteps(monkeypatch, {"sharded": [1.5, 0.8], "one_blas": 3.0, "plain": [1.5, 1.0]})
    assert parallel.choose_step(None, cfg.replace(batch_size=16), clock=fake2.clock) == "sharded"
    assert fake2.calls.count("sharded") == 1 + n


def test_a_first_call_that_loads_code_does_not_cut_a_step(monkeypatch, tmp_path):
    """A candidate whose first call is slow (its compiled code loading, when nothing warmed the
    kernels before) is warmed up once more before the cut, and so still takes turns and wins."""
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    for var in ("NUMGPT_FUSED", "NUMGPT_DATA_PARALLEL", "NUMGPT_STEP"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(parallel, "_choices_path",
                        lambda kernels=True: str(tmp_path / "choices.json"))
    cfg = numgpt.get_config("residual")
    fake = FakeSteps(monkeypatch, {"fused_lanes": [3.0, 0.012], "fused": [2.5, 0.01],
                                   "sharded": 0.02, "one_blas": 0.03, "plain": 0.04})
    assert parallel.choose_step(None, cfg, clock=fake.clock) == "fused"
    assert fake.calls[5:7] == ["fused_lanes", "fused"]  # the two over the cut, once more


def test_malloc_is_tuned_before_any_steps_threads_allocate(monkeypatch):
    """A thread takes its malloc arena at its first allocation and keeps it, so numgpt asks for
    one arena (training_starts) before a step's threads exist: the sharded and one-BLAS steps
    when they are made, the measurement before it makes any; afterwards the measurement gives
    its candidates' freed memory back."""
    calls = []
    monkeypatch.setattr(parallel, "training_starts", lambda: calls.append("tuned"))
    monkeypatch.setattr(parallel, "give_back_freed_memory", lambda: calls.append("trimmed"))
    m = numgpt.GPT(numgpt.get_config("residual", vocab_size=20, dropout=0.1), seed=0)
    s = parallel.ShardedStep(m, 2)
    assert calls == ["tuned"] and all(not p._threads for p in s.pools)  # no thread started yet
    s.close()
    parallel.OneBlasThreadStep(m)
    assert calls == ["tuned"] * 2
    calls.clear()
    monkeypatch.setattr(parallel, "make_step",
                        lambda n, model: (calls.append(n) or (lambda *a, **k: (0.0, {})),
                                          lambda: None))
    parallel.measure_steps(m, m.cfg, ["one_blas", "plain"])
    assert calls[0] == "tuned" and calls[1:3] == ["one_blas", "plain"] and calls[-1] == "trimmed"


def test_a_damaged_choices_file_is_measured_over(monkeypatch, tmp_path):
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    for var in ("NUMGPT_FUSED", "NUMGPT_DATA_PARALLEL", "NUMGPT_STEP"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "choices.json"
    monkeypatch.setattr(parallel, "_choices_path", lambda kernels=True: str(path))
    cfg = numgpt.get_config("residual")
    fake = FakeSteps(monkeypatch, {"fused_lanes": 0.0015, "fused": 0.001, "sharded": 0.003,
                                   "one_blas": 0.002, "plain": 0.005})
    for junk in ("{not json", "[1, 2]", "[" * 100000, '{"k": 5}'):
        path.write_text(junk)
        assert parallel.choose_step(None, cfg, clock=fake.clock) == "fused"
    key = parallel._choice_key(cfg, parallel.candidates(cfg))
    path.write_text(json.dumps({key: {"step": "warp-drive"}}))
    assert parallel.planned_step(cfg) is None
    assert parallel.choose_step(None, cfg, clock=fake.clock) == "fused"


def test_real_steps_are_measured(monkeypatch, tmp_path):
    """The measurement runs the real candidates on random ids and leaves the model as it was."""
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    for var in ("NUMGPT_FUSED", "NUMGPT_DATA_PARALLEL", "NUMGPT_STEP"):
        monkeypatch.delenv(var, raising=False)
    cfg = numgpt.get_config("residual", vocab_size=20)
    m = numgpt.GPT(cfg, seed=0)
    before = m.get_params()
    times = parallel.measure_steps(m, cfg, parallel.candidates(cfg))
    assert set(times) <= set(parallel.STEPS) and times and all(t > 0 for t in times.values())
    assert times.layers == cfg.n_layer  # steps of milliseconds: the whole model
    monkeypatch.setattr(parallel, "LONG_STEP_SECONDS", 0.0)  # any step is long: one layer
    times = parallel.measure_steps(m, cfg, parallel.candidates(cfg))
    assert times.layers == 1 and set(times) == set(parallel.candidates(cfg))
    for k, v in m.params.items():
        np.testing.assert_array_equal(v, before[k])


def test_small_models_step_with_one_blas_thread(monkeypatch):
    """Tiny models: the model's own step, with OpenBLAS held to one thread for its duration."""
    from threadpoolctl import threadpool_info
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    cfg = numgpt.get_config("residual", vocab_size=20, dropout=0.1)  # (without: the fused step)
    m = numgpt.GPT(cfg, seed=1, dtype=np.float64)
    step, close = parallel.make_step("one_blas", m)
    seen = []
    real = m.loss_and_grads

    def spy(*a, **k):
        seen.append([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])
        return real(*a, **k)
    monkeypatch.setattr(m, "loss_and_grads", spy)
    x = np.random.default_rng(0).integers(0, 20, (cfg.batch_size, cfg.block_size))
    loss, grads = step(x, x, train=False)
    assert seen and all(n == 1 for n in seen[0])
    loss2, grads2 = real(x, x, train=False)
    assert abs(loss - loss2) < 1e-12
    for k in grads:
        np.testing.assert_allclose(grads[k], grads2[k], rtol=1e-10, atol=1e-13)
    close()


def test_sharded_training_resumes_to_the_same_model(text_file, tmp_path, monkeypatch):
    """Resumed and unbroken sharded runs agree to float32 rounding. Not bit for bit: in about one
    full test run in five, a few weights differed in the last bit (two threads computing at once;
    not found where, see parallel.py). The plain path is bit-exact (test_journey.py)."""
    from numgpt.checkpoint import load_checkpoint
    from numgpt.data import load_dataset
    from numgpt.trainer import read_log, train
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    monkeypatch.setenv("NUMGPT_STEP", "sharded")
    cfg = numgpt.get_config("laptop", n_embd=16, n_head=2, n_layer=2, block_size=16, batch_size=4,
                            max_iters=20, eval_interval=10, eval_iters=2, dropout=0.1)
    ds = load_dataset(text_file)
    full = train(cfg, ds, str(tmp_path / "full"), quiet=True, sample_chars=0)
    train(cfg, ds, str(tmp_path / "part"), quiet=True, sample_chars=0, stop_at=7)
    rest = train(cfg, ds, str(tmp_path / "part"), resume=True, quiet=True, sample_chars=0)
    a = [(r["step"], r["val_loss"]) for r in read_log(full["log"])]
    b = [(r["step"], r["val_loss"]) for r in read_log(rest["log"])]
    assert [s for s, _ in a] == [s for s, _ in b] == [0, 10, 20]
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-5)
    pa, pb = load_checkpoint(full["checkpoint"])[0], load_checkpoint(rest["checkpoint"])[0]
    for k in pa:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-4, atol=1e-6)


def test_grad_scale_scales_the_gradients_not_the_loss():
    """loss_and_grads(grad_scale=w): the gradients of w * loss (how ShardedStep weights a shard)."""
    cfg = numgpt.get_config("preln", vocab_size=20, batch_size=3)
    m = numgpt.GPT(cfg, seed=1, dtype=np.float64)
    x = np.random.default_rng(0).integers(0, 20, (3, cfg.block_size))
    loss, grads = m.loss_and_grads(x, x, train=False)
    loss2, grads2 = m.loss_and_grads(x, x, train=False, grad_scale=0.25)
    assert loss2 == loss
    for k in grads:
        np.testing.assert_allclose(grads2[k], 0.25 * grads[k], rtol=1e-12, atol=1e-15)


def test_malloc_keeps_freed_memory():
    """When training starts, numgpt asks glibc's malloc to keep freed memory
    (numgpt._threads.keep_freed_memory): every setting took, and a 64 MB block then comes from the
    heap, not from a fresh mapping (glibc's default threshold is at most 32 MB). Off glibc it says
    it did nothing; NUMGPT_NO_MALLOPT=1 skips it."""
    import ctypes
    import platform

    from numgpt import _threads
    glibc = platform.libc_ver()[0] == "glibc"
    tuned = _threads.keep_freed_memory()
    if _threads._opted_out():
        assert tuned is False
        return
    assert tuned is glibc
    if not glibc:
        return

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                                                   "hblkhd", "usmblks", "fsmblks", "uordblks",
                                                   "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):  # glibc < 2.33
        return
    libc.mallinfo2.restype = Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    mapped = libc.mallinfo2().hblkhd
    block = libc.malloc(64 << 20)
    try:
        assert block and libc.mallinfo2().hblkhd == mapped
    finally:
        libc.free(ctypes.c_void_p(block))


IMPORT_ORDER = """
import os, sys, json
env = dict(os.environ)
if sys.argv[1] == "numpy-first":
    import numpy
import numgpt
from numgpt import _threads
same_env = dict(os.environ) == env
tuned_on_import = _threads.MALLOC_TUNED
m = numgpt.build_model("laptop", n_layer=1, vocab_size=5)  # kernels on: they load here
timeouts = [lib.openblas_thread_timeout() for lib in _threads._openblas_libraries()]
import numpy as np
ids = np.zeros((2, 4), dtype=np.int64)
m.loss(ids, ids)
tuned_before_training = _threads.MALLOC_TUNED
m.loss_and_grads(ids, ids)  # training starts
step = numgpt.training_step(m)
step(ids, ids)
step.close()
changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))
print(json.dumps([same_env, tuned_on_import, _threads.PARALLEL_KERNELS, timeouts,
                  tuned_before_training, _threads.MALLOC_TUNED, changed]))
"""


def _threads_opted_out():
    from numgpt import _threads
    return _threads._opted_out()


@pytest.mark.parametrize("order", ["numpy-first", "numgpt-first"])
def test_import_order_changes_nothing(order):
    """`import numpy; import numgpt` once left OpenBLAS's threads spinning, so the kernels ran on
    one thread (half the speed). Now importing numgpt changes neither the environment nor malloc;
    when the kernels load, every OpenBLAS in the process spins short (restarted if it had
    started without the setting) and the kernels may use their threads; malloc keeps freed
    memory once training starts (the first gradients), not for a loss alone; training changes
    no environment variable but the two short spins; in either order."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT")}
    r = subprocess.run([sys.executable, "-c", IMPORT_ORDER, order], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    same_env, tuned_on_import, parallel, timeouts, tuned_early, tuned, changed = json.loads(
        r.stdout.strip().splitlines()[-1])
    assert same_env and tuned_on_import is False and tuned_early is False
    # training changed the environment by the short spins alone (threadpoolctl, which numgpt
    # uses, sets KMP_DUPLICATE_LIB_OK when imported: numgpt takes that back)
    from numgpt._threads import SHORT_SPINS
    assert set(changed) <= set(SHORT_SPINS), changed
    assert parallel is True
    import platform
    assert tuned is (platform.libc_ver()[0] == "glibc" and not _threads_opted_out())
    assert timeouts and all(t == 4 for t in timeouts)


def test_the_rounds_end_when_one_step_is_left(monkeypatch, tmp_path):
    """Where after a round every other step is over SLOW_FACTOR times the best, the best is not
    timed again (a long step would only spend time with nothing left to compare it to)."""
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    for var in ("NUMGPT_FUSED", "NUMGPT_DATA_PARALLEL", "NUMGPT_STEP"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(parallel, "_choices_path",
                        lambda kernels=True: str(tmp_path / "choices.json"))
    cfg = numgpt.get_config("residual", dropout=0.1)  # sharded, one_blas, plain
    fake = FakeSteps(monkeypatch, {"sharded": [1.5, 1.0], "one_blas": 2.0, "plain": [1.5, 1.6]})
    said = []
    assert parallel.choose_step(None, cfg, say=said.append, clock=fake.clock) == "sharded"
    assert sorted(fake.calls) == sorted(["sharded", "one_blas", "plain"] * 2)  # warm-up, a round
    assert said[-1].startswith("step: sharded, the fastest measured here (sharded 1 s, plain 1.6 s")
    # where two stay within SLOW_FACTOR, both are timed MIN_ROUNDS times
    fake2 = FakeSteps(monkeypatch, {"sharded": [1.5, 1.0], "one_blas": 2.0, "plain": [1.5, 1.4]})
    parallel.choose_step(None, cfg.replace(batch_size=16), clock=fake2.clock)
    assert fake2.calls.count("sharded") == fake2.calls.count("plain") == 1 + parallel.MIN_ROUNDS


def test_choices_are_cached_per_cpu_not_per_model_name(monkeypatch):
    """The machine a choice is cached for is the CPU as numba compiles for it: /proc/cpuinfo's
    model name ("AMD EPYC") is shared by CPUs with and without AVX-512, so the key holds LLVM's
    name for the CPU and a hash of its features as well; the one-line description the bench
    prints says which vector extensions it has."""
    from llvmlite import binding
    line = parallel.cpu()
    assert binding.get_host_cpu_name() in line
    has_512 = bool(binding.get_host_cpu_features().get("avx512f"))
    assert ("no AVX-512" not in line and "AVX-512" in line) == has_512
    key = parallel.measured_key({"n_embd": 8}, ["a", "b"])
    monkeypatch.setattr(parallel, "_cpu_features", lambda: "another-cpu")
    assert parallel.measured_key({"n_embd": 8}, ["a", "b"]) != key
