"""numgpt: a character-level GPT in NumPy with hand-written backward passes.

    import numpy as np, numgpt
    model = numgpt.build_model("preln", dtype=np.float64, seed=0, n_layer=2)
    x = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (4, 8))  # ids [B, T]
    y = np.roll(x, -1, axis=1)                                              # next ids
    loss, grads = model.loss_and_grads(x, y, rng=np.random.default_rng(0))
    opt = numgpt.AdamW(model.params, lr=1e-3, weight_decay=0.01)
    opt.step(grads)
    with numgpt.training_step(model) as step:  # the step train.py takes (the fastest here)
        loss, grads = step(x, y, rng=np.random.default_rng(0))
"""
import numpy as np

from . import paths as _paths
from .config import LADDER, LADDER_TARGETS, PRESETS, Config, ConfigError, get_config
from .model import GPT, param_shapes
from .optim import AdamW, clip_grad_norm, get_lr
from .parallel import TrainingStep as training_step

__version__ = "0.1.0"

_paths.find_kernels_in_clone()  # in a clone, numgpt.kernels is the clone's kernels/ folder


def build_model(preset="laptop", seed=0, dtype=np.float32, **overrides):
    """A fresh GPT from a preset name plus config overrides (any Config field)."""
    return GPT(get_config(preset, **overrides), seed=seed, dtype=dtype)


def make_optimizer(model, cfg=None):
    """AdamW over model.params with the betas, eps, weight decay and learning rate of cfg (or model.cfg)."""
    cfg = cfg or model.cfg
    return AdamW(model.params, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                 weight_decay=cfg.weight_decay, use_kernels=cfg.kernels)


__all__ = ["AdamW", "Config", "ConfigError", "GPT", "LADDER", "LADDER_TARGETS", "PRESETS",
           "build_model", "clip_grad_norm", "get_config", "get_lr", "make_optimizer",
           "param_shapes", "training_step"]
