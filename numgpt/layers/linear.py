"""Linear layer y = x W + b, for any number of leading dimensions.

W is stored [in, out] (the transpose of torch.nn.Linear.weight), so the forward pass is a plain matmul.

Derivation: docs/derivations.md#linear
Gradient check: tests/test_layers.py::test_linear_grad
"""


def linear_forward(x, W, b=None):
    """x: [..., C_in], W: [C_in, C_out], b: [C_out] or None -> y [..., C_out], cache

    The leading dimensions are flattened so that the product is one [N, C_in] x [C_in, C_out]
    matrix multiply (one BLAS call, rather than one per batch row).
    """
    y = x.reshape(-1, x.shape[-1]) @ W
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], W.shape[1]), (x, W, b is not None)


def linear_backward(dy, cache):
    """dx = dy W^T,  dW = x^T dy (summed over all leading dims),  db = sum of dy over leading dims.

    dy: [..., C_out] -> dx [..., C_in], dW [C_in, C_out], db [C_out] or None
    (docs/derivations.md#linear)
    """
    x, W, has_bias = cache
    x2 = x.reshape(-1, x.shape[-1])      # [N, C_in]
    dy2 = dy.reshape(-1, dy.shape[-1])   # [N, C_out]
    dx = (dy2 @ W.T).reshape(x.shape)
    dW = x2.T @ dy2
    db = dy2.sum(axis=0) if has_bias else None
    return dx, dW, db
