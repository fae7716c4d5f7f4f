"""Configuration: one flat dataclass for model and training, the ladder presets, --key=value parsing.

Every rung of the ladder in docs (bigram .. scaled) is a preset, i.e. a set of overrides of the
defaults below; `laptop` is the default preset of train.py.
"""
import dataclasses
import math
import re
from dataclasses import dataclass, fields

import numpy as np

from .arch import ACTIVATIONS, NORMS
from .env import FALSE, TRUE


EPS_MIN = 1e-30  # AdamW's eps: a normal float32 with room to spare (the smallest is 1.2e-38)
EVALS_PER_RUN = 10  # evaluations after step 0 of a run with eval_interval=0 (a time budget's)
MAX_TIME_LIMIT = 366 * 86400.0  # the longest time budget accepted: a year


class ConfigError(ValueError):
    """A configuration the model or trainer cannot run; the message is one line for the user."""


@dataclass
class Config:
    # --- model ---
    model: str = "gpt"            # "bigram" (logits = embedding(token)) or "gpt"
    vocab_size: int = 65
    block_size: int = 8           # context length T
    n_embd: int = 32              # channels C
    n_head: int = 4               # heads; head size = n_embd // n_head
    n_layer: int = 1              # blocks
    attn_proj: bool = False       # output projection after the concatenated heads
    ffn_mult: float = 0.0         # feed-forward width as a multiple of n_embd; 0 = no feed-forward
    ffn_proj: bool = True         # second linear of the feed-forward (width -> n_embd)
    activation: str = "relu"      # "relu" or "gelu" (tanh form)
    residual: bool = False        # x + f(x) around attention and feed-forward
    norm: str = "none"            # "none", "post" (LN after the residual add) or "pre" (LN before f)
    dropout: float = 0.0          # on attention weights, after the projection, after the feed-forward
    init: str = "torch"           # "torch" (PyTorch's default layer init) or "normal" (N(0, init_std))
    init_std: float = 0.02
    zero_head: bool = False       # output layer (lm_head, or the bigram table) starts at 0: loss = ln V
                                  # (the video's rungs draw it as init says; docs/ladder.md)
    kernels: bool = True          # numba kernels (kernels/); false = the NumPy reference layers
    # --- training ---
    batch_size: int = 32
    max_iters: int = 5000
    max_time: float = 0.0         # a time budget in seconds: max_iters is then fixed from the step's
                                  # measured cost (numgpt/budget.py); 0 = off
    learning_rate: float = 1e-3
    min_lr: float = 1e-4          # end of the cosine decay
    warmup_iters: int = 0
    decay_lr: bool = False        # cosine decay from learning_rate to min_lr over max_iters
    weight_decay: float = 0.01    # AdamW, on matrices and embeddings only
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 0.0        # clip the global gradient norm; 0 = off
    eval_interval: int = 500      # steps between evaluations; 0 = a tenth of max_iters
    eval_iters: int = 200
    seed: int = 1337

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    @property
    def ffn_hidden(self):
        return int(round(self.ffn_mult * self.n_embd))

    @property
    def eval_every(self):
        """Steps between evaluations: eval_interval, or with eval_interval=0 a tenth of max_iters
        (rounded up), so that a run evaluates EVALS_PER_RUN times after step 0 whatever its length."""
        return self.eval_interval or max(1, -(-self.max_iters // EVALS_PER_RUN))

    def to_dict(self):
        return dataclasses.asdict(self)

    def replace(self, **kw):
        return validate(dataclasses.replace(self, **kw))


FIELDS = {f.name: f for f in fields(Config)}

_RUNG = dict(model="gpt", block_size=8, n_embd=32, batch_size=32, learning_rate=1e-3,
             max_iters=5000, eval_interval=500, eval_iters=200)

PRESETS = {
    # the ladder of the video (see docs/ladder.md); published validation losses in LADDER_TARGETS
    "bigram": dict(model="bigram", block_size=8, batch_size=32, learning_rate=1e-2,
                   max_iters=3000, eval_interval=300, eval_iters=200, n_layer=0),
    "single_head": dict(_RUNG, n_head=1, n_layer=1),
    "multi_head": dict(_RUNG, n_head=4, n_layer=1),
    "ffn": dict(_RUNG, n_head=4, n_layer=1, ffn_mult=1.0, ffn_proj=False),
    "residual": dict(_RUNG, n_head=4, n_layer=3, attn_proj=True, ffn_mult=4.0, residual=True),
    "layernorm": dict(_RUNG, n_head=4, n_layer=3, attn_proj=True, ffn_mult=4.0, residual=True,
                      norm="post"),
    "preln": dict(_RUNG, n_head=4, n_layer=3, attn_proj=True, ffn_mult=4.0, residual=True,
                  norm="pre"),
    "scaled": dict(model="gpt", block_size=256, n_embd=384, n_head=6, n_layer=6, attn_proj=True,
                   ffn_mult=4.0, residual=True, norm="pre", dropout=0.2, init="normal",
                   batch_size=64, learning_rate=3e-4, max_iters=5000, eval_interval=500,
                   eval_iters=200),
    # the default of train.py: a small pre-norm GPT trained for 10 minutes on whatever machine runs
    # it (max_time; what it reaches: README). --max_iters=N instead trains N steps; max_iters
    # below is the length with the budget turned off (--max_time=0), about what 10 minutes buy
    # on a machine like ours. The rate decays to a hundredth of its peak: a tenth ended higher
    # (docs/recipes.md).
    "laptop": dict(model="gpt", block_size=64, n_embd=128, n_head=4, n_layer=4, attn_proj=True,
                   ffn_mult=4.0, residual=True, norm="pre", dropout=0.0, init="normal",
                   zero_head=True, batch_size=8, learning_rate=2e-3, min_lr=2e-5, decay_lr=True,
                   warmup_iters=100, max_iters=25000, max_time=600.0, eval_interval=0,
                   eval_iters=100, weight_decay=0.1, beta2=0.99, grad_clip=1.0),
}
# an hour on the same recipe: a wider model over a longer context, with dropout against the 25-35
# passes it makes over the training text (the choice: docs/recipes.md; what it reaches: README)
PRESETS["hour"] = dict(PRESETS["laptop"], block_size=128, n_embd=192, n_head=6, dropout=0.1,
                       learning_rate=1.5e-3, min_lr=1.5e-4, max_iters=26000, max_time=3600.0)

LADDER = ["bigram", "single_head", "multi_head", "ffn", "residual", "layernorm", "preln", "scaled"]
LADDER_TARGETS = {"bigram": 2.49, "single_head": 2.40, "multi_head": 2.28, "ffn": 2.27,
                  "residual": 2.09, "layernorm": 2.08, "preln": 2.08, "scaled": 1.48}


def parse_whole_number(text):
    """The whole number written in text: as an integer (1000, +20), or in a float's notation when
    its value is whole (1e3, 2000.0; below 2^53, where floats hold every integer). Anything else
    (1.5, 1e-3, nan, inf, 0x10, 1_000, non-ASCII digits) raises ValueError. train.py and
    sample.py read whole numbers with this one rule."""
    s = text.strip()
    if re.fullmatch(r"[+-]?[0-9]+", s, flags=re.ASCII):
        return int(s)
    if re.fullmatch(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", s, flags=re.ASCII):
        f = float(s)
        if math.isfinite(f) and f.is_integer() and abs(f) < 2 ** 53:
            return int(f)
    raise ValueError(f"not a whole number: {text!r}")


DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text):
    """Seconds in a duration such as 90s, 10m, 1.5h or 600 (plain seconds); ValueError otherwise
    (no other units, signs, exponents, nan or inf)."""
    m = re.fullmatch(r"\s*([0-9]+\.?[0-9]*|\.[0-9]+)\s*([smh]?)\s*", text, flags=re.ASCII)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return float(m.group(1)) * DURATION_UNITS[m.group(2)]


def format_duration(seconds):
    """A duration for people, in the units parse_duration reads: 45s, 10m, 1.5h."""
    for unit, scale in (("h", 3600.0), ("m", 60.0)):
        if seconds >= 2 * scale or (seconds >= scale and seconds % scale == 0):
            return f"{seconds / scale:.3g}{unit}"
    return f"{seconds:.3g}s"


def _coerce(name, value):
    """Turn a string (from the command line) into the type of field `name`."""
    if name == "max_time" and isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError:
            raise ConfigError(f"max_time must be a duration such as 90s, 10m or 1.5h (or seconds, "
                              f"600; 0 = no time budget), got {value!r}") from None
    f = FIELDS[name]
    typ = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool,
                                                    "str": str}[f.type]
    if isinstance(value, np.generic) and not isinstance(value, np.bool_):
        value = value.item()  # numpy scalars (np.float32(3e-4), np.int64(2)) as Python numbers
    if not isinstance(value, str):
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > 2 ** 1023:  # float() would raise OverflowError
                raise ConfigError(f"{name} must be a finite number, got a whole number too large "
                                  "for a float")
            return float(value)
        if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{name} must be {typ.__name__}, got {value!r}")
    s = value.strip()
    if typ is bool:
        if s.lower() in TRUE:
            return True
        if s.lower() in FALSE:
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if typ is int:
        try:
            return parse_whole_number(s)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number such as 1000 or 1e3, got "
                              f"{value!r}") from None
    if typ is float:
        try:
            return float(s)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    return s


def validate(cfg):
    """Refuse configurations that cannot run, with a one-line message naming the field."""
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)
    for name, f in FIELDS.items():  # NaN slips through comparisons; inf through most
        if f.type in (float, "float"):
            need(math.isfinite(getattr(cfg, name)),
                 f"{name} must be a finite number, got {getattr(cfg, name)}")
    need(cfg.model in ("bigram", "gpt"), f"model must be 'bigram' or 'gpt', got {cfg.model!r}")
    for name in ("vocab_size", "block_size", "batch_size", "max_iters", "eval_iters"):
        need(getattr(cfg, name) >= 1, f"{name} must be at least 1, got {getattr(cfg, name)}")
    need(cfg.eval_interval >= 0,
         f"eval_interval must be >= 0 (0 = a tenth of max_iters), got {cfg.eval_interval}")
    need(0 <= cfg.max_time <= MAX_TIME_LIMIT,
         f"max_time must be between 0 (off) and a year ({MAX_TIME_LIMIT:.0f} s), got {cfg.max_time}")
    need(cfg.warmup_iters >= 0, f"warmup_iters must be >= 0, got {cfg.warmup_iters}")
    if cfg.model == "gpt":
        need(cfg.n_embd >= 1, f"n_embd must be at least 1, got {cfg.n_embd}")
        need(cfg.n_head >= 1, f"n_head must be at least 1, got {cfg.n_head}")
        need(cfg.n_layer >= 1, f"n_layer must be at least 1 for model 'gpt', got {cfg.n_layer}")
        need(cfg.n_embd % cfg.n_head == 0,
             f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
        need(cfg.ffn_mult >= 0 and math.isfinite(cfg.ffn_mult),
             f"ffn_mult must be >= 0, got {cfg.ffn_mult}")
        need(cfg.ffn_mult == 0 or cfg.ffn_hidden >= 1,
             f"ffn_mult {cfg.ffn_mult} gives a feed-forward of width 0")
        need(cfg.ffn_proj or cfg.ffn_mult == 0 or cfg.ffn_hidden == cfg.n_embd,
             "ffn_proj=false needs ffn_mult=1 (the feed-forward must return n_embd channels)")
    need(cfg.activation in ACTIVATIONS,
         f"activation must be 'relu' or 'gelu', got {cfg.activation!r}")
    need(cfg.norm in NORMS,
         f"norm must be 'none', 'post' or 'pre', got {cfg.norm!r}")
    need(cfg.init in ("torch", "normal"), f"init must be 'torch' or 'normal', got {cfg.init!r}")
    need(0.0 <= cfg.dropout < 1.0, f"dropout must be in [0, 1), got {cfg.dropout}")
    need(0.0 < cfg.learning_rate < 10.0 and math.isfinite(cfg.learning_rate),
         f"learning_rate must be in (0, 10), got {cfg.learning_rate}")
    need(0.0 <= cfg.min_lr <= cfg.learning_rate,
         f"min_lr must be in [0, learning_rate], got {cfg.min_lr}")
    # AdamW scales decayed weights by 1 - lr * weight_decay each step (lr <= learning_rate):
    # at 1 they are zeroed, above it they flip sign, above 2 they grow without bound
    need(0.0 <= cfg.weight_decay and cfg.learning_rate * cfg.weight_decay < 1.0,
         f"weight_decay must be in [0, 1 / learning_rate) = [0, {1 / cfg.learning_rate:g}) "
         f"(AdamW scales the weights by 1 - learning_rate * weight_decay each step), got "
         f"{cfg.weight_decay}")
    # the optimizer runs in float32, where a beta above 1 - 2**-24 rounds to 1
    need(all(0.0 <= b < 1.0 and np.float32(b) < 1.0 for b in (cfg.beta1, cfg.beta2)),
         f"beta1 and beta2 must be in [0, 1) (in float32: at most 0.99999994), got {cfg.beta1} "
         f"and {cfg.beta2}")
    # the update divides m by sqrt(v) + eps, and both are 0 where a gradient is 0: below float32's
    # smallest normal number (1.2e-38) eps is denormal or 0, and 0 / 0 is NaN at the first step
    need(EPS_MIN <= cfg.eps < 1, f"eps must be in [{EPS_MIN:g}, 1) (the optimizer runs in float32, "
         f"where a much smaller eps is 0 or denormal), got {cfg.eps}")
    need(cfg.grad_clip >= 0 and math.isfinite(cfg.grad_clip),
         f"grad_clip must be >= 0 (0 = off), got {cfg.grad_clip}")
    need(0 < cfg.init_std < 10, f"init_std must be in (0, 10), got {cfg.init_std}")
    need(0 <= cfg.seed < 2 ** 63, f"seed must be a whole number >= 0, got {cfg.seed}")
    return cfg


def get_config(preset="laptop", base=None, **overrides):
    """The Config of a preset with overrides applied and checked, e.g. get_config('preln', n_layer=2).
    base: a Config that stands in for the preset (a resumed run's own, from its checkpoint).

    The length of a run is set either by max_iters or by a time budget (max_time): a max_iters
    given here turns off the preset's budget (the laptop preset's 10 minutes), and giving both
    is refused."""
    if base is not None:
        values = base.to_dict()
    elif preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    else:
        values = dict(PRESETS[preset])
    for k, v in overrides.items():
        if k not in FIELDS:
            raise ConfigError(f"unknown config key {k!r}; known keys: {', '.join(FIELDS)}")
        values[k] = _coerce(k, v)
    if "max_iters" in overrides:
        if "max_time" in overrides and values["max_time"] != 0:
            raise ConfigError("max_iters and max_time both set the length of the run; give one "
                              "of them (max_time=0 turns the time budget off)")
        values["max_time"] = 0.0
    return validate(Config(**values))


def config_from_dict(d):
    """Rebuild a Config from to_dict() output (e.g. read from a checkpoint); unknown keys are refused."""
    unknown = set(d) - set(FIELDS)
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    return validate(Config(**{k: _coerce(k, v) for k, v in d.items()}))
