"""slerp, nuslerp, multislerp, karcher and model_stock against slow oracles, and the vector
building blocks they share (fusion.api.vectors).

The oracles follow docs/strategies.md (mergekit's algorithms) literally, on the vectors
themselves, in float64 numpy: karcher iterates on its mean vector, multislerp projects vectors
onto the tangent space. The strategies instead work on the coefficients of the inputs (from their
Gram matrix) and round once to float32, so results are compared within a few float32 ulps of the
inputs' scale (the coefficient's own rounding and the combination's), not bitwise. Endpoints
and the special cases of the formulas (zero, parallel and opposite vectors) are checked exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import fusion
from fusion.api import vectors
from fusion.plugins.model_stock import ModelStock
from fusion.plugins.slerp import Nuslerp, Slerp
from fusion.plugins.sphere_means import Karcher, Multislerp

CTX = fusion.TensorContext("tensor")
EPS32 = 2.0 ** -24

# bf16-rounded values: sums of a few are exact, so zero, parallel and opposite vectors are exact
VALUES = sorted(set(torch.tensor([0.0, 0.1, -0.1, 0.3, -0.3, 1.0, -1.0, 2.5, -2.5, 1e-3, 0.5, 7.0],
                                 dtype=torch.bfloat16).float().tolist()))
shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)


@st.composite
def tensors(draw, count: int, shape=None):
    """``count`` float32 tensors of one shape: fresh, zero, a multiple of an earlier one
    (parallel or opposite) or a mix of an earlier one and fresh values."""
    shape = draw(shapes) if shape is None else shape
    n = math.prod(shape)
    elements = st.one_of(st.sampled_from(VALUES), st.floats(-4, 4, width=32))
    out: list[np.ndarray] = []
    for _ in range(count):
        kind = draw(st.sampled_from(["fresh", "fresh", "fresh", "zero", "multiple", "mix"]))
        fresh = np.array(draw(st.lists(elements, min_size=n, max_size=n)), dtype=np.float32)
        if kind == "zero":
            fresh = np.zeros(n, np.float32)
        elif kind == "multiple" and out:
            fresh = (out[-1] * np.float32(draw(st.sampled_from([2.0, -1.0, 0.5, -3.0])))).astype(np.float32)
        elif kind == "mix" and out:
            keep = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
            fresh = np.where(keep, out[-1], fresh).astype(np.float32)
        out.append(fresh)
    return [torch.from_numpy(x.reshape(shape)) for x in out]


def scale_of(*xs) -> float:
    return max([1.0] + [float(x.abs().max()) for x in xs if x.numel()])


def assert_close(actual: torch.Tensor, expected: np.ndarray, atol: float) -> None:
    assert actual.dtype == torch.float32
    np.testing.assert_allclose(actual.double().numpy().reshape(-1), np.asarray(expected).reshape(-1),
                               rtol=0, atol=atol)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


# ---------------------------------------------------------------------------------------------
# Oracles (float64, on the vectors)


def o_slerp(a: np.ndarray, b: np.ndarray, t: float) -> tuple[np.ndarray, float]:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    dot = min(max(float(np.sum((a / na) * (b / nb))), -1.0), 1.0)
    if abs(dot) > 0.9995:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(dot)
        ca, cb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return ca * a + cb * b, abs(ca) + abs(cb)


def o_nuslerp_vector(v0: np.ndarray, v1: np.ndarray, t: float) -> tuple[np.ndarray, float]:
    u0 = v0 / max(np.linalg.norm(v0), 1e-7)
    u1 = v1 / max(np.linalg.norm(v1), 1e-7)
    c = min(max(float(np.sum(u0 * u1)), -1.0), 1.0)
    if 1 - c * c <= 1e-12:
        return (1 - t) * v0 + t * v1, abs(1 - t) + abs(t)
    theta = math.acos(c)
    c0, c1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return c0 * v0 + c1 * v1, abs(c0) + abs(c1)


def as_vectors(x: np.ndarray, layout: str) -> np.ndarray:
    """The vectors of ``x`` as the rows of a matrix (mergekit: flatten, last axis, axis 0)."""
    if layout == "tensor" or x.ndim < 2:
        return x.reshape(1, -1)
    if layout == "rows":
        return x.reshape(-1, x.shape[-1])
    return np.moveaxis(x, 0, -1).reshape(-1, x.shape[0])


def from_vectors(v: np.ndarray, like: np.ndarray, layout: str) -> np.ndarray:
    if layout == "tensor" or like.ndim < 2 or layout == "rows":
        return v.reshape(like.shape)
    moved = np.moveaxis(like, 0, -1).shape
    return np.moveaxis(v.reshape(moved), -1, 0)


def o_nuslerp(a, b, weights, base=None, layout="tensor"):
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    x0, x1 = (a, b) if base is None else (a - base, b - base)
    v0, v1 = as_vectors(x0, layout), as_vectors(x1, layout)
    rows = [o_nuslerp_vector(p, q, t) for p, q in zip(v0, v1)]
    out = from_vectors(np.stack([r for r, _ in rows]) if rows else v0, x0, layout)
    coef = max([c for _, c in rows], default=1.0)
    return (out if base is None else base + out), coef


def o_multislerp(xs, weights, normalize, eps):
    w = np.array(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    flat = [x.reshape(-1) for x in xs]
    norms = [np.linalg.norm(x) for x in flat]
    units = [x / (n + eps) for x, n in zip(flat, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mn = np.linalg.norm(mean)
    if mn < eps:
        assert len(xs) == 2
        return w[0] * flat[0] + w[1] * flat[1]
    mean = mean / mn
    tangent = sum(wi * (u - np.dot(u, mean) * mean) for wi, u in zip(w, units))
    tau = np.linalg.norm(tangent) + eps
    r = mean * math.cos(tau) + tangent * (math.sin(tau) / tau)
    return r * float(np.sum(np.array(norms) * w))


def o_karcher(xs, max_iter, tol):
    flat = [x.reshape(-1).astype(np.float64) for x in xs]
    alpha = 1.0 / len(flat)
    norms = [np.linalg.norm(x) for x in flat]
    units = [x / n if n != 0 else np.zeros_like(x) for x, n in zip(flat, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return np.zeros_like(flat[0])
    share = 1.0 / len(valid)
    mean = sum(share * units[i] for i in valid)
    mn = np.linalg.norm(mean)
    mean = units[valid[0]].copy() if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for i in valid:
            dot = min(max(float(np.dot(mean, units[i])), -1.0), 1.0)
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += share * (theta / math.sin(theta)) * (units[i] - dot * mean)
        tn = np.linalg.norm(tangent)
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        un = np.linalg.norm(mean)
        if un > tol:
            mean = mean / un
    return sum(alpha * n for n in norms) * mean


def o_model_stock(base, xs, filter_wise):
    layout = "rows" if filter_wise else "tensor"
    b = as_vectors(base.astype(np.float64), layout)
    deltas = [as_vectors(x.astype(np.float64), layout) - b for x in xs]
    n = len(xs)
    out = []
    for r in range(b.shape[0]):
        cos = []
        for i in range(n):
            for j in range(i + 1, n):
                d = np.dot(deltas[i][r], deltas[j][r]) / max(
                    np.linalg.norm(deltas[i][r]) * np.linalg.norm(deltas[j][r]), 1e-6)
                cos.append(min(max(d, -1.0), 1.0))
        c = sum(cos) / len(cos)
        den = 1 + (n - 1) * c
        t = 0.0 if abs(den) < 1e-6 else n * c / den
        mean = sum(b[r] + d[r] for d in deltas) / n
        out.append(t * mean + (1 - t) * b[r])
    return np.stack(out).reshape(base.shape) if out else base.astype(np.float64)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


ts = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.3, 1e-3, 0.999, -0.5, 1.5]), st.floats(-1, 2))


# ---------------------------------------------------------------------------------------------
# fusion.api.vectors


@given(st.integers(1, 4), shapes, st.sampled_from(vectors.VECTORS), st.booleans(), st.data())
def test_gram_and_combination_match_the_definition(m, shape, layout, with_base, data):
    xs = data.draw(tensors(m + 1, shape))
    base, xs = (xs[0], xs[1:]) if with_base else (None, xs[1:])
    g = vectors.gram(xs, base, layout)
    diffs = [np64(x) if base is None else np64(x - base) for x in xs]
    rows = [as_vectors(d, layout) for d in diffs]
    assert g.shape == (vectors.vector_count(shape, layout), m, m) == (rows[0].shape[0], m, m)
    expected = np.einsum("ivk,jvk->vij", np.stack(rows), np.stack(rows))
    np.testing.assert_allclose(g, expected, rtol=1e-12, atol=1e-300)
    coef = np.array(data.draw(st.lists(st.floats(-2, 2), min_size=m * g.shape[0], max_size=m * g.shape[0])))
    coef = coef.reshape(g.shape[0], m).astype(np.float32).astype(np.float64)
    out = vectors.combination(xs, coef, base, layout)
    combined = from_vectors(np.einsum("vi,ivk->vk", coef, np.stack(rows)), diffs[0], layout)
    if base is not None:
        combined = combined + np64(base)
    scale = scale_of(*xs, *([base] if base is not None else []))
    assert_close(out, combined, 6 * m * EPS32 * scale * 2 * (np.abs(coef).max(initial=1) + 1))


def test_combination_rounds_like_the_plain_expression():
    gen = torch.Generator().manual_seed(0)
    a, b, base = (torch.randn(1000, generator=gen) for _ in range(3))
    c = np.array([0.3, -1.7])
    out = vectors.combination([a, b], c, base)
    expected = base + ((a - base) * float(np.float32(0.3)) + (b - base) * float(np.float32(-1.7)))
    assert bits_equal(out, expected)


# ---------------------------------------------------------------------------------------------
# slerp


@given(st.data(), ts)
def test_slerp_matches_oracle(data, t):
    a, b = data.draw(tensors(2))
    na, nb = (max(float(np.linalg.norm(np64(x))), 1e-30) for x in (a, b))
    assume(abs(abs(float(np.sum(np64(a) * np64(b)))) / na / nb - 0.9995) > 1e-9)  # the threshold itself
    out = Slerp().merge(a.clone(), [b.clone()], {"t": t}, CTX)
    expected, coef = o_slerp(np64(a).reshape(-1), np64(b).reshape(-1), t)
    assert_close(out, expected, 4 * EPS32 * scale_of(a, b) * (coef + 1))


@given(st.data())
def test_slerp_endpoints_are_exact(data):
    a, b = data.draw(tensors(2))
    a.reshape(-1)[:1] = -0.0  # a signed zero too
    assert bits_equal(Slerp().merge(a.clone(), [b.clone()], {"t": 0.0}, CTX), a)
    assert bits_equal(Slerp().merge(a.clone(), [b.clone()], {"t": 1.0}, CTX), b)


def test_slerp_special_vectors():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    x = torch.tensor([1.0, -1.0, 0.5, 2.0])

    def slerp(p, q, t):
        return Slerp().merge(p.clone(), [q.clone()], {"t": t}, CTX)

    # a zero vector is orthogonal to everything (θ = π/2), not interpolated linearly
    torch.testing.assert_close(slerp(torch.zeros(4), x, 0.5), math.sin(math.pi / 4) * x)
    # parallel and antiparallel: linear
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)
    torch.testing.assert_close(slerp(a, -a, 0.25), 0.5 * a)
    # the 0.9995 threshold: cos 0.99955 is linear, cos 0.99946 spherical
    v = torch.tensor([1.0, 0.0])
    near = torch.tensor([math.cos(0.03), math.sin(0.03)])
    torch.testing.assert_close(slerp(v, near, 0.5), 0.5 * (v + near))
    far = torch.tensor([math.cos(0.033), math.sin(0.033)])
    torch.testing.assert_close(slerp(v, far, 0.5), torch.tensor([math.cos(0.0165), math.sin(0.0165)]))


def test_slerp_nan_propagates():
    a = torch.tensor([1.0, float("nan"), 3.0])
    out = Slerp().merge(a.clone(), [torch.ones(3)], {"t": 0.5}, CTX)
    assert torch.isnan(out).all()  # the dot product is NaN, so is every coefficient


# ---------------------------------------------------------------------------------------------
# nuslerp


weights2 = st.lists(st.one_of(st.sampled_from([1.0, 0.0, 0.5, -1.0, 3.0]), st.floats(-3, 3)),
                    min_size=2, max_size=2)


@given(st.data(), weights2, st.booleans(), st.booleans(), st.booleans())
def test_nuslerp_matches_oracle(data, weights, flatten, row_wise, with_base):
    xs = data.draw(tensors(3))
    base, a, b = (xs[0] if with_base else None), xs[1], xs[2]
    params = {"weight": weights, "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    layout = "tensor" if flatten else ("columns" if row_wise else "rows")
    x0, x1 = (np64(a), np64(b)) if base is None else (np64(a - base), np64(b - base))
    for p, q in zip(as_vectors(x0, layout), as_vectors(x1, layout)):
        c = np.dot(p, q) / max(np.linalg.norm(p), 1e-7) / max(np.linalg.norm(q), 1e-7)
        assume(not 1e-14 < 1 - c * c < 1e-6)  # nearly opposite vectors: the result is ill-conditioned
    out = Nuslerp().merge(None if base is None else base.clone(), [a.clone(), b.clone()], params, CTX)
    expected, coef = o_nuslerp(np64(a), np64(b), weights, None if base is None else np64(base), layout)
    assert_close(out, expected, 6 * EPS32 * scale_of(*xs) * (coef + 1) * 2)


@given(st.data(), st.booleans())
def test_nuslerp_weights_one_and_zero_give_that_model_exactly(data, with_base):
    base, a, b = data.draw(tensors(3))
    params = {"weight": [1.0, 0.0], "nuslerp_flatten": True, "nuslerp_row_wise": False}
    first = Nuslerp().merge(base.clone() if with_base else None, [a.clone(), b.clone()], params, CTX)
    assert bits_equal(first, a)
    params["weight"] = [0.0, 2.0]
    assert bits_equal(Nuslerp().merge(base.clone() if with_base else None, [a.clone(), b.clone()], params, CTX), b)


def test_nuslerp_special_cases():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    x = torch.tensor([1.0, -1.0, 0.5, 2.0])
    flat = {"nuslerp_flatten": True, "nuslerp_row_wise": False}

    def nuslerp(p, q, w):
        return Nuslerp().merge(None, [p.clone(), q.clone()], {"weight": w, **flat}, CTX)

    torch.testing.assert_close(nuslerp(torch.zeros(4), x, [1.0, 1.0]), math.sin(math.pi / 4) * x)
    torch.testing.assert_close(nuslerp(a, 2 * a, [1.0, 1.0]), 1.5 * a)
    torch.testing.assert_close(nuslerp(a, -a, [3.0, 1.0]), 0.5 * a)  # antiparallel: linear
    # weights summing to 0: t = 1/2
    torch.testing.assert_close(nuslerp(a, x, [1.0, -1.0]), nuslerp(a, x, [1.0, 1.0]))
    # unlike slerp, a cosine of 0.99955 is still spherical
    v, near = torch.tensor([1.0, 0.0]), torch.tensor([math.cos(0.03), math.sin(0.03)])
    torch.testing.assert_close(nuslerp(v, near, [1.0, 1.0]), torch.tensor([math.cos(0.015), math.sin(0.015)]))


def test_nuslerp_row_wise_runs_along_axis_0():
    # columns [1, 0] and [0, 1]: per column, the first model's is parallel to the second's
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    params = {"weight": [1.0, 1.0], "nuslerp_flatten": False}
    cols = Nuslerp().merge(None, [a.clone(), b.t().clone()], {**params, "nuslerp_row_wise": True}, CTX)
    rows = Nuslerp().merge(None, [a.clone(), b.clone()], {**params, "nuslerp_row_wise": False}, CTX)
    torch.testing.assert_close(rows, 1.5 * a)
    torch.testing.assert_close(cols, 1.5 * a)


# ---------------------------------------------------------------------------------------------
# multislerp


@given(st.integers(2, 4), st.booleans(), st.booleans(), st.data())
def test_multislerp_matches_oracle(m, with_base, normalize, data):
    xs = data.draw(tensors(m + 1))
    base, models = (xs[0] if with_base else None), xs[1:]
    w = data.draw(st.lists(st.one_of(st.sampled_from([1.0, 0.5, 2.0]), st.floats(0.1, 3)),
                           min_size=m, max_size=m))
    diffs = [np64(x) if base is None else np64(x - base) for x in models]
    units = [d.reshape(-1) / (np.linalg.norm(d) + 1e-8) for d in diffs]
    wn = np.array(w) / (sum(w) if normalize else 1.0)
    # keep away from the ill-posed case of directions that (nearly) cancel
    assume(np.linalg.norm(sum(wi * u for wi, u in zip(wn, units))) > 1e-3 * np.abs(wn).sum())
    params = {"weight": w, "normalize_weights": normalize, "eps": 1e-8}
    out = Multislerp().merge(None if base is None else base.clone(), [x.clone() for x in models], params, CTX)
    expected = o_multislerp(diffs, w, normalize, 1e-8)
    if base is not None:
        expected = expected + np64(base).reshape(-1)
    bound = max(1.0, float(np.abs(wn).sum())) * len(models) * 4
    assert_close(out, expected, 1e-5 * scale_of(*xs) * bound)


def test_multislerp_special_cases():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    x = torch.tensor([1.0, -1.0, 0.5, 2.0])
    params = {"normalize_weights": True, "eps": 1e-8}
    # one model: that model, exactly, the base not even read
    assert bits_equal(Multislerp().merge(torch.zeros(4), [x.clone()], {"weight": [0.3], **params}, CTX), x)
    # two opposite directions with equal weights: the linear fallback
    torch.testing.assert_close(Multislerp().merge(None, [a.clone(), -a], {"weight": [1.0, 1.0], **params}, CTX),
                               torch.zeros(4))
    with pytest.raises(fusion.MergeError, match="zero"):
        Multislerp().merge(None, [a.clone(), -a, torch.zeros(4)], {"weight": [1.0, 1.0, 1.0], **params}, CTX)
    with pytest.raises(fusion.MergeError, match="sum to 0"):
        Multislerp().merge(None, [a.clone(), x.clone()], {"weight": [1.0, -1.0], **params}, CTX)
    # parallel inputs: the mean direction times the weighted mean norm
    torch.testing.assert_close(Multislerp().merge(None, [a.clone(), 3 * a], {"weight": [1.0, 1.0], **params}, CTX),
                               2 * a)


# ---------------------------------------------------------------------------------------------
# karcher


@given(st.integers(2, 4), st.data())
def test_karcher_matches_oracle(m, data):
    xs = data.draw(tensors(m))
    flat = [np64(x).reshape(-1) for x in xs]
    valid = [f / np.linalg.norm(f) for f in flat if np.linalg.norm(f) > 1e-5]
    # away from opposite directions, where the mean is not unique
    assume(not valid or np.linalg.norm(sum(valid)) > 0.1 * len(valid))
    params = {"max_iter": data.draw(st.sampled_from([0, 1, 10, 50])), "tol": 1e-5}
    out = Karcher().merge(None, [x.clone() for x in xs], params, CTX)
    expected = o_karcher([np64(x) for x in xs], params["max_iter"], params["tol"])
    # a stopping decision taken on the other side of tol moves the mean by less than ~tol
    assert_close(out, expected, 3e-5 * scale_of(*xs) * m)


def test_karcher_special_cases_and_convergence():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    params = {"max_iter": 10, "tol": 1e-5}

    def karcher(*xs, **kw):
        return Karcher().merge(None, [x.clone() for x in xs], {**params, **kw}, CTX)

    torch.testing.assert_close(karcher(torch.zeros(4), a), 0.5 * a)  # no direction, half the scale
    torch.testing.assert_close(karcher(a, 2 * a), 1.5 * a)
    torch.testing.assert_close(karcher(torch.zeros(4), torch.zeros(4)), torch.zeros(4))
    assert bits_equal(karcher(a), a)
    # orthonormal e₁, e₂, e₃: the mean direction is their normalised sum, at unit norm
    e = torch.eye(3)
    torch.testing.assert_close(karcher(*e), torch.ones(3) / math.sqrt(3))
    # unequal angles: after convergence the Riemannian gradient Σ log_m(uᵢ) vanishes
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(50, generator=gen) + 2 for _ in range(3)]
    mean = karcher(*xs, max_iter=200, tol=1e-12).double()
    m = mean / mean.norm()
    grad = torch.zeros(50, dtype=torch.float64)
    for x in xs:
        u = x.double() / x.double().norm()
        c = float(torch.dot(m, u))
        theta = math.acos(min(1.0, c))
        grad += theta / math.sin(theta) * (u - c * m)
    assert float(grad.norm()) < 1e-5
    # max_iter 0: the normalised mean direction times the mean norm
    start = sum(x / x.norm() for x in xs)
    torch.testing.assert_close(karcher(*xs, max_iter=0), start / start.norm() * sum(x.norm() for x in xs) / 3)


# ---------------------------------------------------------------------------------------------
# model_stock


@given(st.integers(2, 4), st.booleans(), st.data())
def test_model_stock_matches_oracle(m, filter_wise, data):
    xs = data.draw(tensors(m + 1))
    base, models = xs[0], xs[1:]
    out = ModelStock().merge(base.clone(), [x.clone() for x in models], {"filter_wise": filter_wise}, CTX)
    expected = o_model_stock(np64(base), [np64(x) for x in models], filter_wise)
    # t is unbounded near its singularity; compare where it is moderate
    b = as_vectors(np64(base), "rows" if filter_wise else "tensor")
    moved = as_vectors(expected, "rows" if filter_wise else "tensor") - b
    mean = sum(as_vectors(np64(x), "rows" if filter_wise else "tensor") - b for x in models) / m
    t = [np.dot(mv, me) / np.dot(me, me) if np.dot(me, me) > 0 else 0.0 for mv, me in zip(moved, mean)]
    assume(max(np.abs(t), default=0) < 10)
    assert_close(out, expected, 8 * m * EPS32 * scale_of(*xs) * (1 + max(np.abs(t), default=0)))


def test_model_stock_special_cases():
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    d = torch.tensor([0.5, -1.0, 0.25, 2.0])
    e = torch.tensor([2.0, 1.0, 0.0, 0.0])  # orthogonal to d

    def stock(*deltas, filter_wise=False, b=base):
        return ModelStock().merge(b.clone(), [b + x for x in deltas], {"filter_wise": filter_wise}, CTX)

    torch.testing.assert_close(stock(d, -d), base)  # opposite: c = −1, the singularity: the base
    torch.testing.assert_close(stock(d, d), base + d)  # identical: t = 1, the average
    torch.testing.assert_close(stock(d, e), base)  # orthogonal: c = 0
    torch.testing.assert_close(stock(d, torch.zeros(4)), base)  # a zero delta
    torch.testing.assert_close(stock(d, d, d), base + d)  # 3 models
    # filter_wise: one t per row
    rows = stock(torch.stack([d, d]), torch.stack([d, -d]), filter_wise=True,
                 b=torch.stack([base, base]))
    torch.testing.assert_close(rows, torch.stack([base + d, base]))


# ---------------------------------------------------------------------------------------------
# The contract


@pytest.mark.parametrize("strategy,base,lo,hi,required", [
    (Slerp(), "required", 1, 1, {"t"}),
    (Nuslerp(), "optional", 2, 2, {"weight"}),
    (Multislerp(), "optional", 1, None, {"weight"}),
    (Karcher(), "unused", 1, None, set()),
    (ModelStock(), "required", 2, None, set()),
])
def test_declarations(strategy, base, lo, hi, required):
    assert (strategy.base, strategy.min_models, strategy.max_models) == (base, lo, hi)
    assert {p.name for p in strategy.parameters if p.required} == required
    assert not strategy.elementwise and not strategy.random
