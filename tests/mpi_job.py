"""The MPI side of tests/test_mpi.py, run there as `mpiexec -n 2 python tests/mpi_job.py
OUT TEXT` (one job for all of it: each rank's start-up, NumPy, numba and the cached kernels, is
the slow part):

- float64: STEPS clipped AdamW steps of each of FLOAT64_CONFIGS with the data-parallel step
  (NumPy layers, random batches); rank 0 saves the losses and the final parameters in
  OUT/float64-<name>.npz for the test to hold against one process.
- float32: numgpt.trainer.train of each of TRAIN_CONFIGS on TEXT into OUT/<name>/, as train.py
  runs it, and a resume of OUT/resume, which the test trained to step RESUME_AT in one process;
  the loss of every step (recording_losses) in OUT/<name>-losses.npy.
"""
import contextlib
import os
import sys

import numpy as np

import numgpt
from numgpt.distributed import DataParallelStep, SINGLE, get_world
from numgpt.optim import clip_grad_norm, get_lr
from numgpt.parallel import PlainStep

STEPS = 20
RESUME_AT = 10

# a ladder rung, the laptop preset, and dropout on a batch that 2 ranks split 3 + 4
FLOAT64_CONFIGS = {
    "preln": numgpt.get_config("preln", vocab_size=65, kernels=False),
    "laptop": numgpt.get_config("laptop", vocab_size=65, kernels=False),
    "dropout": numgpt.get_config("preln", vocab_size=65, kernels=False, dropout=0.2,
                                 batch_size=7, grad_clip=1.0),
}
_EVERY_STEP = dict(max_iters=STEPS, eval_interval=10, eval_iters=2)
# float32 training: a ladder rung, the laptop preset, and dropout (with GELU, and with ReLU: see
# tests/test_mpi.py for why both) on batches that 2 ranks split 3 + 4
_DROPOUT = dict(n_layer=2, dropout=0.1, batch_size=7, **_EVERY_STEP)
TRAIN_CONFIGS = {
    "preln": numgpt.get_config("preln", **_EVERY_STEP),
    "laptop": numgpt.get_config("laptop", **_EVERY_STEP),
    "dropout": numgpt.get_config("laptop", activation="gelu", **_DROPOUT),
    "dropout_relu": numgpt.get_config("laptop", **_DROPOUT),
}
RESUMED = "dropout"  # the config of OUT/resume


def float64_run(cfg, world=SINGLE, steps=STEPS):
    """(losses [steps], params) of steps clipped AdamW steps of cfg in float64 on random batches,
    the step data-parallel over world's ranks."""
    model = numgpt.GPT(cfg, seed=cfg.seed, dtype=np.float64)
    opt = numgpt.make_optimizer(model, cfg)
    rng = np.random.default_rng(cfg.seed)
    step = PlainStep(model)
    if world.size > 1:
        step = DataParallelStep(world, step, model)
    losses = []
    for it in range(steps):
        x = rng.integers(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size))
        y = rng.integers(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size))
        loss, grads = step(x, y, train=True, rng=rng)
        clip_grad_norm(grads, cfg.grad_clip)
        opt.step(grads, get_lr(it, cfg))
        losses.append(loss)
    return np.array(losses), model.params


@contextlib.contextmanager
def recording_losses():
    """A list that gets the loss of every training step numgpt.trainer.train takes meanwhile
    (the mean over the global batch), from a wrapper around the step it makes."""
    from numgpt import trainer
    losses, make = [], trainer.train_step

    def recorded(*args, **kwargs):
        step, close, name = make(*args, **kwargs)

        def step_and_record(*a, **k):
            loss, grads = step(*a, **k)
            losses.append(loss)
            return loss, grads
        return step_and_record, close, name
    trainer.train_step = recorded
    try:
        yield losses
    finally:
        trainer.train_step = make


def main(out, text):
    from numgpt.data import load_dataset
    from numgpt.trainer import train
    world = get_world()
    assert world.size > 1, "run me under mpiexec"
    for name, cfg in FLOAT64_CONFIGS.items():
        losses, params = float64_run(cfg, world)
        if world.is_root:
            np.savez(os.path.join(out, f"float64-{name}.npz"), losses=losses, **params)
    ds = world.from_root(lambda: load_dataset(text))
    runs = [(name, cfg, False) for name, cfg in TRAIN_CONFIGS.items()]
    for name, cfg, resume in runs + [("resume", TRAIN_CONFIGS[RESUMED], True)]:
        with recording_losses() as losses:
            train(cfg, ds, os.path.join(out, name), resume=resume, quiet=True, sample_chars=0,
                  world=world)
        if world.is_root:
            np.save(os.path.join(out, f"{name}-losses.npy"), np.array(losses))
    if world.is_root:
        with open(os.path.join(out, "done"), "w") as f:
            f.write(f"{world.size} ranks, {world.threads} threads each\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
