"""Finite-difference gradient checking (central differences, float64).

rel_error(a, n) = ||a - n|| / max(||a|| + ||n||, tiny), the norms taken over a whole tensor (or over
the sampled entries of it), so an entry whose true gradient is ~0 cannot blow the ratio up.
See docs/derivations.md#gradient-checking.
"""
import numpy as np


def rel_error(a, n, tiny=1e-30):
    a = np.asarray(a, dtype=np.float64).ravel()
    n = np.asarray(n, dtype=np.float64).ravel()
    return float(np.linalg.norm(a - n) / max(np.linalg.norm(a) + np.linalg.norm(n), tiny))


def numeric_grad(f, x, h=1e-6, indices=None):
    """Central differences of the scalar function f() with respect to the array x, perturbed in place.

    indices: flat indices to check (all when None); returns the numeric gradient at those entries.
    """
    flat = x.reshape(-1)
    if indices is None:
        indices = range(flat.size)
    out = []
    for i in indices:
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        out.append((fp - fm) / (2 * h))
    return np.array(out)


def sample_indices(size, k, rng):
    """Up to k distinct flat indices of a tensor of `size` entries (all of them when size <= k)."""
    if size <= k:
        return np.arange(size)
    return np.sort(rng.choice(size, k, replace=False))


def check_model_grads(model, x, y, train=True, seed=0, per_tensor=20, h=1e-6, sample_seed=0,
                      tiny=1e-30):
    """Relative error of model.loss_and_grads against central differences of model.loss, per tensor.

    Dropout masks are replayed by handing every evaluation a Generator with the same seed.
    Returns dict name -> relative error over `per_tensor` sampled entries of that tensor.
    tiny: the smallest gradient norm errors are measured against. Central differences carry a
    rounding error of about 1e-16 * |loss| / h per entry, so sampled entries whose true gradient
    is smaller than ~1e-8 cannot be checked to 1e-4 relative; tiny=1e-4 turns the check of such
    entries into an absolute one (error below 1e-8).
    """
    if model.dtype != np.float64:
        raise ValueError("gradient checks need a float64 model")
    _, grads = model.loss_and_grads(x, y, train=train, rng=np.random.default_rng(seed))
    pick = np.random.default_rng(sample_seed)

    def f():
        return model.loss(x, y, train=train, rng=np.random.default_rng(seed))

    errors = {}
    for name, p in model.params.items():
        ix = sample_indices(p.size, per_tensor, pick)
        num = numeric_grad(f, p, h, ix)
        errors[name] = rel_error(grads[name].reshape(-1)[ix], num, tiny)
    return errors


def check_layer(forward, backward, arrays, seed=0, h=1e-6):
    """Relative error of a layer's backward against central differences, for every input array.

    forward(**arrays) -> (out, cache);  backward(dout, cache) -> dict name -> gradient.
    The scalar checked is sum(out * dout) with a fixed random dout, so every output entry matters.
    Returns dict name -> relative error over all entries of that array.
    """
    out, cache = forward(**arrays)
    dout = np.random.default_rng(seed).standard_normal(np.shape(out))
    analytic = backward(dout, cache)

    def f():
        return float(np.sum(forward(**arrays)[0] * dout))

    return {name: rel_error(analytic[name], numeric_grad(f, arrays[name], h))
            for name in analytic}
