"""LayerNorm over the last dimension, forward and backward in one pass over each row.

NumPy reference: numgpt/layers/layernorm.py. Derivation: docs/derivations.md#layernorm
The forward keeps mean and 1/std per row (not xhat); the backward recomputes xhat. The parameter
gradients are sums over rows: each chunk of rows sums into its own partial row, and the partials
are added at the end, so parallel chunks never write the same element. The arithmetic stays in
the arrays' dtype: C and 1 are typed (numba would widen a float32 sum divided by the integer C,
and every variable it flows into, to float64).
"""
import math

from numba import prange

from ._jit import jit


@jit(parallel=True)
def layernorm_fwd(x, g, b, eps, y, mean, rstd):
    """x [N, C] -> y [N, C], mean [N], rstd [N]; two passes per row (mean, then centred variance):
    mean = sum_c x_c / C,  rstd = 1 / sqrt(sum_c (x_c - mean)^2 / C + eps),
    y_c = (x_c - mean) rstd g_c + b_c."""
    N, C = x.shape
    zero = y.dtype.type(0)  # typed 0 (np.zeros(1)[0] would be a parallel loop of its own)
    one = y.dtype.type(1)
    width = y.dtype.type(C)
    for n in prange(N):
        mu = zero
        for c in range(C):
            mu += x[n, c]
        mu /= width
        var = zero
        for c in range(C):
            d = x[n, c] - mu
            var += d * d
        var /= width
        r = one / math.sqrt(var + eps)
        for c in range(C):
            y[n, c] = (x[n, c] - mu) * r * g[c] + b[c]
        mean[n] = mu
        rstd[n] = r


@jit(parallel=True)
def layernorm_bwd(dy, x, g, mean, rstd, n_chunks, dx, dg_part, db_part):
    """dy [N, C] -> dx [N, C]; dg_part, db_part [n_chunks, C] partial sums of dy * xhat and dy.

    dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)),  dxhat = dy g
    """
    N, C = x.shape
    zero = dx.dtype.type(0)
    width = dx.dtype.type(C)
    per = (N + n_chunks - 1) // n_chunks
    for k in prange(n_chunks):
        for c in range(C):
            dg_part[k, c] = zero
            db_part[k, c] = zero
        for n in range(k * per, min(N, (k + 1) * per)):
            mu = mean[n]
            r = rstd[n]
            m1 = zero
            m2 = zero
            for c in range(C):
                xh = (x[n, c] - mu) * r
                dxh = dy[n, c] * g[c]
                m1 += dxh
                m2 += dxh * xh
                dg_part[k, c] += dy[n, c] * xh
                db_part[k, c] += dy[n, c]
            m1 /= width
            m2 /= width
            for c in range(C):
                xh = (x[n, c] - mu) * r
                dx[n, c] = r * (dy[n, c] * g[c] - m1 - xh * m2)
