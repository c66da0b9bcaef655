"""Tensors as vectors: the dot products of a few tensors in float64, and float32 linear
combinations of them.

The geometric strategies (slerp, nuslerp, multislerp, karcher, model_stock) treat each tensor, or
each row or column of it, as a vector. All they need of the data is the Gram matrix of their
inputs (every dot product xᵢ·xⱼ, the squared norms on its diagonal): from it they compute a few
coefficients per vector (angles, weights, an iterated mean, all in the span of the inputs), and
the result is one linear combination Σᵢ cᵢxᵢ. So a merge reads its inputs twice, once for
:func:`gram` and once for :func:`combination`, and never holds a float64 or intermediate copy of
a whole tensor. :mod:`fusion.api.kernels` has the C twins of both (same layouts, same
arithmetic), which a strategy's compiled path uses.

Layouts (``vectors``): ``"tensor"``, the whole tensor is one vector; ``"rows"``, vectors run
along the last axis (each row ``W[i, :]`` of a 2-D weight; a tensor of fewer than 2 dimensions is
one vector); ``"columns"``, vectors run along axis 0 (each column ``W[:, j]``; of an N-D tensor,
each ``W[:, j, k, …]``).

Arithmetic: xᵢ is θᵢ, or θᵢ − θ₀ rounded to float32 when a base θ₀ is given. Dot products are
sums of exact float64 products, accumulated in float64 (so they are exactly 0 only for zero
vectors, and a different summation order moves them by a few float64 ulps at most). A
combination rounds each coefficient to float32 and computes, per element and in float32,
``c₀·x₀ + c₁·x₁ + …`` left to right, each product and each sum rounded (no fused multiply-add),
then adds θ₀ when a base is given.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # importing a plugin must not import torch
    import numpy as np
    import torch

__all__ = ["VECTORS", "matrix_shape", "vector_count", "gram", "combination"]

#: the layouts a tensor splits into vectors by
VECTORS = ("tensor", "rows", "columns")

#: float32 elements per input handled at once: bounds the float64 temporaries
_CHUNK = 1 << 20


def matrix_shape(shape: Sequence[int], vectors: str) -> tuple[int, int]:
    """The tensor as a row-major matrix (R, C): its vectors are the rows (``tensor``: one row
    of all n elements; ``rows``) or the columns (``columns``)."""
    if vectors not in VECTORS:
        raise ValueError(f"vectors must be one of {', '.join(VECTORS)}, not {vectors!r}")
    n = math.prod(shape)
    if vectors == "tensor" or len(shape) < 2:
        return (1, n) if vectors != "columns" else (n, 1)
    if vectors == "rows":
        return math.prod(shape[:-1]), shape[-1]
    return shape[0], math.prod(shape[1:])


def vector_count(shape: Sequence[int], vectors: str) -> int:
    """How many vectors a tensor of ``shape`` splits into."""
    r, c = matrix_shape(shape, vectors)
    return c if vectors == "columns" else r


def _differences(tensors, base, sl):
    xs = [t.reshape(-1)[sl] if base is None else t.reshape(-1)[sl] - base.reshape(-1)[sl] for t in tensors]
    return [x.double() for x in xs]


def gram(tensors: "Sequence[torch.Tensor]", base: "torch.Tensor | None" = None,
         vectors: str = "tensor") -> "np.ndarray":
    """G[v, i, j] = xᵢ·xⱼ over vector v, for xᵢ = θᵢ (or θᵢ − θ₀): a float64 array of shape
    (vectors, m, m) for m tensors of one shape (float32 or any dtype torch widens exactly)."""
    import torch

    m = len(tensors)
    shape = tuple(tensors[0].shape)
    rows, cols = matrix_shape(shape, vectors)
    count = vector_count(shape, vectors)
    out = torch.zeros((count, m, m), dtype=torch.float64)
    if count == 1:  # one vector: the whole tensor, in chunks of elements
        n = rows * cols
        for a in range(0, n, _CHUNK):
            xs = _differences(tensors, base, slice(a, min(n, a + _CHUNK)))
            for i in range(m):
                for j in range(i, m):
                    out[0, i, j] += torch.dot(xs[i], xs[j])
    else:
        step = max(1, _CHUNK // max(cols, 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            xs = [x.reshape(r1 - r0, cols) for x in _differences(tensors, base, slice(r0 * cols, r1 * cols))]
            for i in range(m):
                for j in range(i, m):
                    if vectors == "rows":
                        out[r0:r1, i, j] = (xs[i] * xs[j]).sum(dim=1)
                    else:
                        out[:, i, j] += (xs[i] * xs[j]).sum(dim=0)
    upper = torch.triu_indices(m, m, 1)
    out[:, upper[1], upper[0]] = out[:, upper[0], upper[1]]
    return out.numpy()


def combination(tensors: "Sequence[torch.Tensor]", coefficients: "np.ndarray",
                base: "torch.Tensor | None" = None, vectors: str = "tensor") -> "torch.Tensor":
    """out = Σᵢ cᵢ·xᵢ per vector, plus θ₀ when ``base`` is given (xᵢ = θᵢ − θ₀ then), in float32:
    ``coefficients`` has shape (vectors, m) (or (m,) for one vector) and is rounded to float32.
    The inputs are not modified."""
    import numpy as np
    import torch

    m = len(tensors)
    shape = tuple(tensors[0].shape)
    rows, cols = matrix_shape(shape, vectors)
    count = vector_count(shape, vectors)
    coef = np.asarray(coefficients, dtype=np.float64).reshape(count, m).astype(np.float32)
    out = torch.empty(shape, dtype=torch.float32)
    flat = out.reshape(-1)
    if count == 1:
        scalars = [float(c) for c in coef[0]]
        n = rows * cols
        for a in range(0, n, _CHUNK):
            sl = slice(a, min(n, a + _CHUNK))
            flat[sl] = _combine([t.reshape(-1)[sl] for t in tensors], scalars,
                                None if base is None else base.reshape(-1)[sl])
        return out
    step = max(1, _CHUNK // max(cols, 1))
    per_vector = torch.from_numpy(coef)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        sl = slice(r0 * cols, r1 * cols)
        c = per_vector[r0:r1].T[:, :, None] if vectors == "rows" else per_vector.T[:, None, :]
        xs = [t.reshape(-1)[sl].reshape(r1 - r0, cols) for t in tensors]
        b = None if base is None else base.reshape(-1)[sl].reshape(r1 - r0, cols)
        flat[sl] = _combine(xs, [c[i] for i in range(m)], b).reshape(-1)
    return out


def _combine(xs, coefs, base):
    acc = None
    for x, c in zip(xs, coefs):
        term = (x.float() if base is None else x.float() - base.float()) * c
        acc = term if acc is None else acc + term
    return acc if base is None else base.float() + acc
