"""An independent PyTorch implementation of numgpt's model family, for cross-checks and benchmarks.

Everything here is plain torch autograd: numgpt is imported only for its Config (which model to
build) and to move parameters between the two (numgpt's flat name -> array dict). None of
numgpt's math is called, so agreement between the two is evidence that numgpt's hand-written
forward and backward passes are right.

    import numpy as np, torch, numgpt
    from bench.torch_reference import TorchGPT, load_numgpt_params, grads_as_numgpt

    np_model = numgpt.build_model("preln", dtype=np.float64, n_layer=2)
    tmodel = TorchGPT(np_model.cfg, attention="sdpa").double().eval()
    load_numgpt_params(tmodel, np_model.get_params())
    logits, loss = tmodel(torch.as_tensor(x), torch.as_tensor(y))
    loss.backward()
    grads = grads_as_numgpt(tmodel)           # same names and layouts as numgpt's grads

The model, as described by a numgpt Config:

    bigram:  logits = tok_emb[idx]                                   (a [V, V] table)
    gpt:     x = tok_emb[idx] + pos_emb[:T]
             n_layer blocks, each with an attention and (when ffn_mult > 0) a feed-forward
             sublayer f, wired by cfg.residual and cfg.norm:
                 norm "none": x = x + f(x)       (x = f(x) without residual)
                 norm "pre":  x = x + f(LN(x))   (x = f(LN(x)))
                 norm "post": x = LN(x + f(x))   (x = LN(f(x)))
             (ln1 belongs to the attention sublayer, ln2 to the feed-forward)
             ln_f (when norm != "none"), then lm_head: logits = x W + b

    attention: q, k, v = x W_q, x W_k, x W_v (no bias), n_head heads of size hs = C / n_head,
               head h using channels h*hs:(h+1)*hs; causal softmax(q k^T / sqrt(hs)) v;
               heads concatenated; optional output projection (attn_proj).
    feed-forward: act(x W_fc + b_fc), then (ffn_proj) a second linear back to C channels;
                  act is ReLU or the tanh form of GELU.
    dropout (cfg.dropout, only in train mode): on the attention probabilities, on the attention
            sublayer's output (after the projection, if any) and on the feed-forward's output.
    LayerNorm: eps 1e-5, biased variance, affine.

Parameter layout: numgpt stores a linear weight as [in, out] (y = x W + b), torch.nn.Linear as
[out, in] (y = x W^T + b), so weights are transposed on the way in and on the way out; embeddings,
biases and LayerNorm parameters are copied as they are.

Run as a script for a quick cross-check of one preset against numgpt:

    python bench/torch_reference.py --preset preln --attention sdpa
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import numgpt  # noqa: F401  (only for Config / build_model; no numgpt math is used here)
except ImportError:  # running from a checkout without numgpt installed: use the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numgpt  # noqa: F401

ATTENTION_IMPLS = ("explicit", "sdpa")
LN_EPS = 1e-5


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q, k, v projections (no bias)."""

    def __init__(self, cfg, attention="explicit"):
        super().__init__()
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
        C = cfg.n_embd
        self.n_head = cfg.n_head
        self.head_size = C // cfg.n_head
        self.attention = attention
        self.p_drop = cfg.dropout
        self.q = nn.Linear(C, C, bias=False)
        self.k = nn.Linear(C, C, bias=False)
        self.v = nn.Linear(C, C, bias=False)
        self.proj = nn.Linear(C, C) if cfg.attn_proj else None
        self.attn_drop = nn.Dropout(cfg.dropout)    # on the attention probabilities
        self.resid_drop = nn.Dropout(cfg.dropout)   # on the sublayer output
        # True above the diagonal: key position j is in the future of query position i
        self.register_buffer("future", torch.triu(torch.ones(cfg.block_size, cfg.block_size,
                                                             dtype=torch.bool), diagonal=1),
                             persistent=False)

    def _split(self, t):
        """[B, T, C] -> [B, H, T, hs]: head h takes channels h*hs:(h+1)*hs."""
        B, T, _ = t.shape
        return t.view(B, T, self.n_head, self.head_size).transpose(1, 2)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        if self.attention == "explicit":
            s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_size))   # [B, H, T, T]
            s = s.masked_fill(self.future[:T, :T], float("-inf"))
            p = self.attn_drop(torch.softmax(s, dim=-1))
            o = p @ v                                                          # [B, H, T, hs]
        else:
            # default scale of sdpa is 1/sqrt(hs), as above; dropout_p must be 0 in eval mode
            o = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.p_drop if self.training else 0.0, is_causal=True)
        y = o.transpose(1, 2).reshape(B, T, C)   # heads concatenated along the channels
        if self.proj is not None:
            y = self.proj(y)
        return self.resid_drop(y)


class FeedForward(nn.Module):
    """act(x W_fc + b_fc) [W_out + b_out], then dropout."""

    def __init__(self, cfg):
        super().__init__()
        C, H = cfg.n_embd, cfg.ffn_hidden
        self.fc = nn.Linear(C, H)
        if cfg.activation == "relu":
            self.act = nn.ReLU()
        elif cfg.activation == "gelu":
            self.act = nn.GELU(approximate="tanh")
        else:
            raise ValueError(f"unknown activation {cfg.activation!r}")
        self.out = nn.Linear(H, C) if cfg.ffn_proj else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.act(self.fc(x))
        if self.out is not None:
            h = self.out(h)
        return self.drop(h)


class Block(nn.Module):
    """One transformer block: attention sublayer, then (optionally) feed-forward sublayer."""

    def __init__(self, cfg, attention="explicit"):
        super().__init__()
        self.residual = cfg.residual
        self.norm = cfg.norm
        C = cfg.n_embd
        has_ln = cfg.norm != "none"
        self.ln1 = nn.LayerNorm(C, eps=LN_EPS) if has_ln else None
        self.attn = CausalSelfAttention(cfg, attention)
        self.ffn = FeedForward(cfg) if cfg.ffn_mult > 0 else None
        self.ln2 = nn.LayerNorm(C, eps=LN_EPS) if (has_ln and self.ffn is not None) else None

    def _sublayer(self, x, f, ln):
        h = ln(x) if self.norm == "pre" else x
        out = f(h)
        x = x + out if self.residual else out
        if self.norm == "post":
            x = ln(x)
        return x

    def forward(self, x):
        x = self._sublayer(x, self.attn, self.ln1)
        if self.ffn is not None:
            x = self._sublayer(x, self.ffn, self.ln2)
        return x


class TorchGPT(nn.Module):
    """The numgpt model family in PyTorch, built from a numgpt Config.

    attention: "explicit" (masked softmax with matmuls) or "sdpa"
    (torch.nn.functional.scaled_dot_product_attention with is_causal=True).
    forward(idx [B, T], targets [B, T] or None) -> (logits [B, T, V], mean cross-entropy or None)
    """

    def __init__(self, cfg, attention="explicit"):
        super().__init__()
        self.cfg = cfg
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
        self.attention = attention
        V, C = cfg.vocab_size, cfg.n_embd
        if cfg.model == "bigram":
            self.tok_emb = nn.Embedding(V, V)
            if cfg.init == "normal":
                self._init_normal(cfg.init_std)
            return
        self.tok_emb = nn.Embedding(V, C)
        self.pos_emb = nn.Embedding(cfg.block_size, C)
        self.blocks = nn.ModuleList(Block(cfg, attention) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(C, eps=LN_EPS) if cfg.norm != "none" else None
        self.lm_head = nn.Linear(C, V)
        if cfg.init == "normal":
            self._init_normal(cfg.init_std)

    @torch.no_grad()
    def _init_normal(self, std):
        """init="normal": weights and embeddings N(0, std), biases 0 (LayerNorm keeps 1 and 0)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None):
        cfg = self.cfg
        if cfg.model == "bigram":
            logits = self.tok_emb(idx)
        else:
            T = idx.shape[1]
            if T > cfg.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
            x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
            for block in self.blocks:
                x = block(x)
            if self.ln_f is not None:
                x = self.ln_f(x)
            logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss


# ---- moving parameters between numgpt's flat dict and the torch module ----

def _name_map(model):
    """numgpt parameter name -> (torch Parameter, transpose?) for every parameter of the model."""
    cfg = model.cfg
    m = {"tok_emb": (model.tok_emb.weight, False)}
    if cfg.model == "bigram":
        return m
    m["pos_emb"] = (model.pos_emb.weight, False)
    for i, blk in enumerate(model.blocks):
        b = f"blocks.{i}."
        for ln_name in ("ln1", "ln2"):
            ln = getattr(blk, ln_name)
            if ln is not None:
                m[b + ln_name + ".g"] = (ln.weight, False)
                m[b + ln_name + ".b"] = (ln.bias, False)
        a = blk.attn
        m[b + "attn.w_q"] = (a.q.weight, True)
        m[b + "attn.w_k"] = (a.k.weight, True)
        m[b + "attn.w_v"] = (a.v.weight, True)
        if a.proj is not None:
            m[b + "attn.w_proj"] = (a.proj.weight, True)
            m[b + "attn.b_proj"] = (a.proj.bias, False)
        if blk.ffn is not None:
            m[b + "ffn.w_fc"] = (blk.ffn.fc.weight, True)
            m[b + "ffn.b_fc"] = (blk.ffn.fc.bias, False)
            if blk.ffn.out is not None:
                m[b + "ffn.w_out"] = (blk.ffn.out.weight, True)
                m[b + "ffn.b_out"] = (blk.ffn.out.bias, False)
    if model.ln_f is not None:
        m["ln_f.g"] = (model.ln_f.weight, False)
        m["ln_f.b"] = (model.ln_f.bias, False)
    m["lm_head.w"] = (model.lm_head.weight, True)
    m["lm_head.b"] = (model.lm_head.bias, False)
    return m


@torch.no_grad()
def load_numgpt_params(model, params):
    """Copy numgpt's name -> array dict into model (cast to each torch parameter's dtype/device).

    Names must match exactly (no missing, no extra); [in, out] weights are transposed to torch's
    [out, in]. Returns model.
    """
    mapping = _name_map(model)
    missing, extra = set(mapping) - set(params), set(params) - set(mapping)
    if missing or extra:
        raise ValueError(f"parameter names do not match: missing {sorted(missing)}, "
                         f"unexpected {sorted(extra)}")
    for name, (p, transpose) in mapping.items():
        a = np.asarray(params[name])
        if transpose:
            a = a.T
        if tuple(a.shape) != tuple(p.shape):
            raise ValueError(f"{name}: numgpt shape {np.asarray(params[name]).shape} does not fit "
                             f"torch shape {tuple(p.shape)} (transposed={transpose})")
        p.copy_(torch.as_tensor(np.ascontiguousarray(a)).to(dtype=p.dtype, device=p.device))
    return model


def _export(model, attr):
    out = {}
    for name, (p, transpose) in _name_map(model).items():
        t = p if attr is None else getattr(p, attr)
        if t is None:
            raise ValueError(f"{name} has no .{attr} (run backward first)")
        a = t.detach().cpu().numpy()
        out[name] = np.ascontiguousarray(a.T if transpose else a)
    return out


def params_as_numgpt(model):
    """The model's parameters as numgpt's name -> array dict ([in, out] weights)."""
    return _export(model, None)


def grads_as_numgpt(model):
    """The gradients (.grad after backward) as numgpt's name -> array dict ([in, out] weights)."""
    return _export(model, "grad")


# ---- quick command-line cross-check ----

def _main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="Cross-check numgpt against this torch reference.")
    ap.add_argument("--preset", default="preln")
    ap.add_argument("--attention", default="explicit", choices=ATTENTION_IMPLS)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    np_model = numgpt.build_model(args.preset, seed=args.seed, dtype=np.float64, dropout=0.0)
    cfg = np_model.cfg
    tmodel = TorchGPT(cfg, attention=args.attention).double().eval()
    load_numgpt_params(tmodel, np_model.get_params())
    rng = np.random.default_rng(args.seed + 1)
    T = cfg.block_size
    x = rng.integers(0, cfg.vocab_size, (args.batch, T))
    y = rng.integers(0, cfg.vocab_size, (args.batch, T))
    loss_np, g_np = np_model.loss_and_grads(x, y, train=False)
    _, loss_t = tmodel(torch.as_tensor(x), torch.as_tensor(y))
    loss_t.backward()
    g_t = grads_as_numgpt(tmodel)
    worst = max((np.linalg.norm(g_np[k] - g_t[k]) / max(np.linalg.norm(g_t[k]), 1e-300), k)
                for k in g_np)
    print(f"{args.preset} ({args.attention}): loss numgpt {loss_np:.15f} torch {loss_t.item():.15f} "
          f"|diff| {abs(loss_np - loss_t.item()):.2e}; worst grad rel err {worst[0]:.2e} ({worst[1]})")


if __name__ == "__main__":
    _main()
