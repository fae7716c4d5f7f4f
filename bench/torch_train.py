"""Train a numgpt preset in PyTorch (bench/torch_reference.TorchGPT), for learning curves side by
side with numgpt's: the same config, data split, training batches (numgpt's Dataset and the same
seeded generator as numgpt's trainer), evaluations (the batches trainer.estimate_loss draws, and
the last over the whole validation text, as numgpt's) and learning-rate schedule
(numgpt.optim.get_lr), with torch's own initialisation, dropout, autograd and AdamW. It checkpoints
at every evaluation, every --ckpt_every=N steps if given, and when stopped (Ctrl-C, SIGTERM,
SIGHUP: after the step under way), so a long run can be continued (--resume).

    /path/to/venv-with-torch/bin/python bench/torch_train.py --preset=scaled --zero_head=false \\
        --max_iters=500 --eval_interval=250 --eval_iters=20 --out_dir=out-torch-scaled

Writes out_dir/log.jsonl (one row per evaluation: step, train_loss, val_loss, time) and
out_dir/torch_ckpt.pt. Any config field is taken as --key=value, as train.py takes them.
"""
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_reference import TorchGPT  # noqa: E402

from numgpt.config import FIELDS, get_config  # noqa: E402
from numgpt.data import load_dataset  # noqa: E402
from numgpt.optim import decays, get_lr  # noqa: E402
from numgpt.trainer import STEP0_EVAL_ITERS, text_windows, whole_val_rows  # noqa: E402

CKPT = "torch_ckpt.pt"
LOG = "log.jsonl"


@torch.no_grad()
def estimate_loss(model, ds, cfg, step, whole_val=False):
    """numgpt.trainer.estimate_loss for the torch model: the same batches, in eval mode; with
    whole_val (the last evaluation) the validation loss over the whole text, in the same windows."""
    model.eval()
    out = {}
    n = cfg.eval_iters if step > 0 else min(cfg.eval_iters, STEP0_EVAL_ITERS)
    for split in ("train", "val"):
        if split == "val" and whole_val:
            x, y = text_windows(ds.val, cfg.block_size)
            rows = whole_val_rows(cfg)
            total = sum(model(torch.from_numpy(x[a:a + rows]), torch.from_numpy(y[a:a + rows]))[1]
                        .item() * len(x[a:a + rows]) for a in range(0, len(x), rows))
            out[split] = total / len(x)
            continue
        rng = np.random.default_rng([cfg.seed, step, 0 if split == "train" else 1])
        losses = []
        for _ in range(n):
            x, y = ds.get_batch(split, cfg.batch_size, cfg.block_size, rng)
            losses.append(model(torch.from_numpy(x), torch.from_numpy(y))[1].item())
        out[split] = float(np.mean(losses))
    model.train()
    return out


def make_optimizer(model, cfg):
    """torch's AdamW with numgpt's groups: weight decay on matrices and embeddings only."""
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps)


def parse(argv):
    opts = {"preset": "scaled", "out_dir": "out-torch", "resume": False, "data": None,
            "ckpt_every": "0"}
    overrides = {}
    for a in argv:
        if a == "--resume":
            opts["resume"] = True
            continue
        if not a.startswith("--") or "=" not in a:
            raise SystemExit(f"torch_train.py: expected --key=value, got {a!r}")
        k, v = a[2:].split("=", 1)
        if k in opts:
            opts[k] = v
        elif k in FIELDS:
            overrides[k] = v
        else:
            raise SystemExit(f"torch_train.py: unknown option --{k}")
    return opts, overrides


def main(argv=None):
    opts, overrides = parse(sys.argv[1:] if argv is None else argv)
    ds = load_dataset(opts["data"])
    cfg = get_config(opts["preset"], **overrides).replace(vocab_size=len(ds.vocab))
    out_dir, ckpt_every = opts["out_dir"], int(opts["ckpt_every"])
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path, log_path = os.path.join(out_dir, CKPT), os.path.join(out_dir, LOG)
    torch.manual_seed(cfg.seed)
    model = TorchGPT(cfg, attention="sdpa")
    opt = make_optimizer(model, cfg)
    rng = np.random.default_rng(cfg.seed)
    step, rows, t_prev = 0, [], 0.0
    if opts["resume"]:
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = state["rng"]
        step, rows = state["step"], state["rows"]
        t_prev = state.get("time", rows[-1]["time"] if rows else 0.0)  # seconds trained so far
        print(f"resuming from step {step}", flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    model.train()
    t0 = time.time()

    def evaluate():
        losses = estimate_loss(model, ds, cfg, step, whole_val=step == cfg.max_iters)
        rows[:] = [r for r in rows if r["step"] < step]
        rows.append({"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                     "time": round(time.time() - t0 + t_prev, 3)})
        save()
        with open(log_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f} "
              f"({rows[-1]['time']:.0f} s)", flush=True)

    def save():
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "torch_rng": torch.get_rng_state(), "rng": rng.bit_generator.state,
                    "rows": rows, "config": cfg.to_dict(),
                    "time": time.time() - t0 + t_prev}, ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)

    stop = []  # SIGINT/SIGTERM/SIGHUP: checkpoint after the step under way, then exit
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    while True:
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            evaluate()
        elif stop or (ckpt_every and step % ckpt_every == 0):
            save()
        if stop:
            print(f"stopped at step {step}; --resume continues", flush=True)
            return
        if step >= cfg.max_iters:
            break
        lr = get_lr(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = ds.get_batch("train", cfg.batch_size, cfg.block_size, rng)
        _, loss = model(torch.from_numpy(x), torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if not math.isfinite(loss.item()):
            raise SystemExit(f"torch_train.py: the loss became {loss.item()} at step {step}")
        step += 1


if __name__ == "__main__":
    main()
