"""Causal attention at T = 3 with every number printed: scores, mask, probabilities, the output,
and the backward pass (docs/shapes.md reproduces this output; tests/test_look.py runs it).

    python -m numgpt.worked_example

One head (B = H = 1), head size hs = 2, small hand-picked q, k, v and an upstream gradient dO.
Every step is computed here with plain NumPy in the order of docs/derivations.md#attention, then
checked against numgpt/layers/attention.py (attention_forward, attention_backward) and against
central finite differences of L = sum(dO * O).
"""
import sys

import numpy as np

from .layers import attention_backward, attention_forward

Q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
K = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
V = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
DO = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])


def steps(q=Q, k=K, v=V, dout=DO):
    """Every intermediate of one causal head, forward then backward, as an ordered dict."""
    T, hs = q.shape
    alpha = hs ** -0.5
    r = {"alpha": alpha}
    r["q k^T"] = q @ k.T
    r["S = alpha q k^T"] = alpha * r["q k^T"]
    mask = np.triu(np.ones((T, T), bool), k=1)
    r["mask (1 = future, set to -inf)"] = mask.astype(float)
    s = np.where(mask, -np.inf, r["S = alpha q k^T"])
    r["S masked"] = s
    e = np.exp(s - s.max(axis=1, keepdims=True))
    r["P = softmax(S masked) by rows"] = e / e.sum(axis=1, keepdims=True)
    p = r["P = softmax(S masked) by rows"]
    r["O = P v"] = p @ v
    r["dO (given)"] = dout
    r["dP = dO v^T"] = dout @ v.T
    dp = r["dP = dO v^T"]
    r["dV = P^T dO"] = p.T @ dout
    r["rowsum(dP * P)"] = (dp * p).sum(axis=1, keepdims=True)
    r["dS = P * (dP - rowsum(dP * P))"] = p * (dp - r["rowsum(dP * P)"])
    ds = r["dS = P * (dP - rowsum(dP * P))"]
    r["dQ = alpha dS k"] = alpha * ds @ k
    r["dK = alpha dS^T q"] = alpha * ds.T @ q
    return r


def _fmt(a):
    if np.ndim(a) == 0:
        return f"{float(a):.4f}"
    rows = []
    for row in np.atleast_2d(a):
        rows.append("  [" + ", ".join(f"{round(x, 4) + 0.0:8.4f}" if np.isfinite(x) else f"{'-inf':>8}"
                                       for x in row) + "]")
    return "\n".join(rows)


def checks(r, q=Q, k=K, v=V, dout=DO, h=1e-6):
    """Max abs differences: against the library's forward/backward and finite differences."""
    sh = lambda a: a[None, None]  # noqa: E731  [T, hs] -> [B=1, H=1, T, hs]
    out, cache = attention_forward(sh(q), sh(k), sh(v))
    dq, dk, dv = attention_backward(sh(dout), cache)
    lib = max(np.abs(out[0, 0] - r["O = P v"]).max(), np.abs(cache[3][0, 0] - r[
        "P = softmax(S masked) by rows"]).max(), np.abs(dq[0, 0] - r["dQ = alpha dS k"]).max(),
        np.abs(dk[0, 0] - r["dK = alpha dS^T q"]).max(), np.abs(dv[0, 0] - r["dV = P^T dO"]).max())

    def loss(qq, kk, vv):
        return float((attention_forward(sh(qq), sh(kk), sh(vv))[0][0, 0] * dout).sum())
    fd = 0.0
    for which, analytic in ((0, r["dQ = alpha dS k"]), (1, r["dK = alpha dS^T q"]),
                            (2, r["dV = P^T dO"])):
        for idx in np.ndindex(q.shape):
            args = [q.copy(), k.copy(), v.copy()]
            args[which][idx] += h
            up = loss(*args)
            args[which][idx] -= 2 * h
            down = loss(*args)
            fd = max(fd, abs((up - down) / (2 * h) - analytic[idx]))
    return lib, fd


def report(out=sys.stdout):
    r = steps()
    w = out.write
    w("Causal attention, one head, T = 3, hs = 2 (python -m numgpt.worked_example)\n\n")
    for name, a in (("q", Q), ("k", K), ("v", V)):
        w(f"{name} [T, hs]\n{_fmt(a)}\n")
    w(f"alpha = 1/sqrt(hs) = {_fmt(r['alpha'])}\n\n--- forward ---\n")
    for name in ("q k^T", "S = alpha q k^T", "mask (1 = future, set to -inf)", "S masked",
                 "P = softmax(S masked) by rows", "O = P v"):
        w(f"{name}\n{_fmt(r[name])}\n")
    s = r["S masked"]
    w(f"row 1 by hand: P[1] = [e^{s[1, 0]:.4f}, e^{s[1, 1]:.4f}] / "
      f"(e^{s[1, 0]:.4f} + e^{s[1, 1]:.4f}) = {_fmt(r['P = softmax(S masked) by rows'][1])}\n")
    w("\n--- backward (L = sum(dO * O)) ---\n")
    for name in ("dO (given)", "dP = dO v^T", "dV = P^T dO", "rowsum(dP * P)",
                 "dS = P * (dP - rowsum(dP * P))", "dQ = alpha dS k", "dK = alpha dS^T q"):
        w(f"{name}\n{_fmt(r[name])}\n")
    ds = r["dS = P * (dP - rowsum(dP * P))"]
    dp = r["dP = dO v^T"]
    w("\n--- what to notice ---\n")
    w(f"dP above the diagonal is not 0 (dP[0, 2] = {dp[0, 2]:.4f}), but dS there is exactly 0 "
      f"(dS[0, 2] = {ds[0, 2]:.4f}): P is 0 at masked entries.\n")
    top = np.abs(ds.sum(axis=1)).max()
    w(f"each row of dS sums to 0 (the largest |row sum| is {'below 1e-15' if top < 1e-15 else top})"
      "\n")
    w(f"row 0 of P is [1, 0, 0], so dS[0] = 0 and query 0 gets no gradient: dQ[0] = "
      f"{_fmt(r['dQ = alpha dS k'][0]).strip()}\n")
    w(f"v[2] is seen only by query 2: dV[2] = P[2, 2] dO[2] = "
      f"{_fmt(r['dV = P^T dO'][2]).strip()}\n")
    lib, fd = checks(r)
    below = lambda x, eps: f"below {eps:.0e}" if x < eps else f"{x:.1e}"  # noqa: E731
    w(f"\nnumgpt/layers/attention.py agrees to {below(lib, 1e-12)}; finite differences "
      f"(h = 1e-6) to {below(fd, 1e-8)}\n")
    return r, lib, fd


def main(argv):
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv:
        from .config import ConfigError
        raise ConfigError(f"python -m numgpt.worked_example takes no options, got {argv[0]!r}")
    report()
    return 0


if __name__ == "__main__":
    from .cli import run
    sys.exit(run(main))
