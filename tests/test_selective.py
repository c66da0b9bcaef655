"""nearswap, arcee_fusion, ram, ramplus_tl and passthrough against slow oracles.

nearswap, ram, ramplus_tl and passthrough are elementwise float32 arithmetic: the oracles emulate
it on Python floats, one rounding per operation (f32()), in the order docs/strategies.md writes,
and must agree bit for bit. arcee_fusion's importance is compared with a float64 evaluation (it is one, rounded twice), and
its selection (quartiles by rank, the threshold, the kept entries) is checked exactly against
sorting.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusion.plugins.arcee_fusion import ArceeFusion, importance, quantile_positions
from fusion.plugins.nearswap import Nearswap
from fusion.plugins.passthrough import Passthrough
from fusion.plugins.ram import Ram, RamPlusTL
from test_strategies import CTX, run, tensor


def f32(x: float) -> float:
    if math.isnan(x):
        return x
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


# values with exact differences, tiny deltas (around epsilon) and exact ties
VALUES = [0.0, -0.0, 1.0, -1.0, 0.5, 0.25, 2.5, 1e-6, -1e-6, 1e-5, 2e-5, -3e-5, 1e-3, 0.1, -0.1]
shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple)


@st.composite
def inputs(draw, min_models=1, max_models=4):
    """(shape, base, models) as flat lists of float32 values; models often share the base's
    values (no change) or change only a few entries, so RAM's counts vary."""
    shape = draw(shapes)
    n = math.prod(shape)
    elements = st.one_of(st.sampled_from(VALUES), st.floats(-4, 4, width=32)).map(f32)
    base = draw(st.lists(elements, min_size=n, max_size=n))
    models = []
    for _ in range(draw(st.integers(min_models, max_models))):
        fresh = draw(st.lists(elements, min_size=n, max_size=n))
        changed = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        models.append([f if c else b for f, b, c in zip(fresh, base, changed)])
    return shape, base, models


def bits(t: torch.Tensor) -> list[int]:
    return t.contiguous().reshape(-1).view(torch.int32).tolist()


def assert_bits_equal(out: torch.Tensor, expected: list[float], shape) -> None:
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(shape)
    assert bits(out) == bits(tensor(expected, shape)), (out.reshape(-1).tolist(), expected)


# ---------------------------------------------------------------------------------------------
# nearswap


def o_nearswap(a: float, b: float, t: float) -> float:
    d = abs(f32(a - b))
    d = d if math.isnan(d) else max(d, f32(1e-6))
    w = f32(f32(1.0 / d) * f32(t))
    w = w if math.isnan(w) else min(max(w, 0.0), 1.0)
    return f32(f32(w * b) + f32(f32(1.0 - w) * a))


ts = st.one_of(st.sampled_from([0.0, 1e-4, 0.01, 0.5, 1.0, 100.0, -1.0]), st.floats(-1, 10, width=32))


@given(inputs(max_models=1), ts)
def test_nearswap_matches_oracle(data, t):
    shape, base, (other,) = data
    out = run(Nearswap(), shape, base, [other], {"t": t})
    assert_bits_equal(out, [o_nearswap(a, b, t) for a, b in zip(base, other)], shape)


def test_nearswap_takes_close_values_and_steps_toward_far_ones():
    a = torch.tensor([1.0, 1.0, 1.0, 1.0])
    b = torch.tensor([1.05, 0.98, 3.0, -1.0])
    out = Nearswap().merge(a.clone(), [b.clone()], {"t": 0.1}, CTX)
    torch.testing.assert_close(out, torch.tensor([1.05, 0.98, 1.1, 0.9]))
    assert torch.equal(Nearswap().merge(a.clone(), [b.clone()], {"t": 0.0}, CTX), a)
    assert torch.equal(Nearswap().merge(a.clone(), [b.clone()], {"t": 1e9}, CTX), b)


# ---------------------------------------------------------------------------------------------
# ram and ramplus_tl


def o_ram_terms(base, models, epsilon):
    deltas = [[f32(t - b) for t, b in zip(m, base)] for m in models]
    eps = f32(epsilon)
    changed = [[abs(x) > eps for x in d] for d in deltas]
    counts = [sum(c[p] for c in changed) for p in range(len(base))]
    return deltas, changed, counts


def o_ram(base, models, epsilon):
    deltas, changed, counts = o_ram_terms(base, models, epsilon)
    out = []
    for p, b in enumerate(base):
        total = None
        for d, c in zip(deltas, changed):
            term = f32((d[p] if c[p] else 0.0 * d[p]) / max(counts[p], 1))
            total = term if total is None else f32(total + term)
        out.append(f32(b + total))
    return out


def o_ramplus(base, models, r, alpha, epsilon):
    deltas, changed, counts = o_ram_terms(base, models, epsilon)
    lambdas = []
    for c in changed:
        shared = sum(1 for p, on in enumerate(c) if on and counts[p] > 1)
        unique = sum(1 for p, on in enumerate(c) if on and counts[p] == 1)
        rho = f32(f32(shared) / max(float(unique), f32(epsilon)))
        lambdas.append(f32(1.0 + f32(f32(r) * min(max(rho, 0.0), f32(alpha)))))
    out = []
    for p, b in enumerate(base):
        total = None
        for d, c, lam in zip(deltas, changed, lambdas):
            x = d[p] if c[p] else 0.0 * d[p]
            term = f32(x * lam) if counts[p] == 1 else f32(x / max(counts[p], 1))
            total = term if total is None else f32(total + term)
        out.append(f32(b + total))
    return out


epsilons = st.sampled_from([1e-5, 0.0, 1e-3, 0.5])
positive_epsilons = st.sampled_from([1e-5, 1e-3, 0.5])


@given(inputs(), epsilons)
def test_ram_matches_oracle(data, epsilon):
    shape, base, models = data
    out = run(Ram(), shape, base, models, {"epsilon": epsilon})
    assert_bits_equal(out, o_ram(base, models, epsilon), shape)


@given(inputs(), st.sampled_from([0.1, 0.0, 1.0, -0.5]), st.sampled_from([0.2, 0.0, 5.0]), positive_epsilons)
def test_ramplus_tl_matches_oracle(data, r, alpha, epsilon):
    shape, base, models = data
    out = run(RamPlusTL(), shape, base, models, {"r": r, "alpha": alpha, "epsilon": epsilon})
    assert_bits_equal(out, o_ramplus(base, models, r, alpha, epsilon), shape)


def test_ram_unique_changes_add_shared_ones_average():
    base = torch.zeros(4)
    m1 = torch.tensor([1.0, 2.0, 0.0, 1e-6])
    m2 = torch.tensor([0.0, 4.0, 0.0, 1e-6])
    out = Ram().merge(base.clone(), [m1.clone(), m2.clone()], {"epsilon": 1e-5}, CTX)
    assert out.tolist() == [1.0, 3.0, 0.0, 0.0]  # below epsilon: dropped, the base kept
    # RAM+: model 1 has 1 unique and 1 shared entry (ρ = 1 → clamped to α), model 2 none unique
    plus = RamPlusTL().merge(base.clone(), [m1.clone(), m2.clone()], {"r": 0.5, "alpha": 0.2, "epsilon": 1e-5}, CTX)
    torch.testing.assert_close(plus, torch.tensor([1.1, 3.0, 0.0, 0.0]))


# ---------------------------------------------------------------------------------------------
# arcee_fusion


def o_importance(base: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The importances in float64, and a bound on the rounding of each: the divergence sums
    terms p·log(p/q) whose logarithms carry an absolute float64 error of a few 1e-16 (p/q is
    rounded near 1), so its error is absolute, ~1e-16 per term, however small the sum; a divergence
    below 1e-12 is 0. The float32 product adds its relative rounding, and half the smallest
    subnormal where it is subnormal."""
    if other.size == 0:
        return other, other
    rows_o = other.reshape(1, -1) if other.ndim < 2 else other
    rows_b = base.reshape(rows_o.shape)

    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(rows_o) + 1e-8, softmax(rows_b) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    kl = np.where(np.abs(kl) < 1e-12, 0.0, kl)
    diff = np.abs(rows_o - rows_b)
    bound = diff * (2 * 2.0 ** -24 * np.abs(kl) + 1e-15 * rows_o.shape[-1]) + 2.0 ** -150
    return (diff * kl).reshape(other.shape), bound.reshape(other.shape)


@given(inputs(max_models=1))
def test_arcee_fusion_matches_oracle(data):
    shape, base, (other,) = data
    b, o = tensor(base, shape), tensor(other, shape)
    scores = importance(b, o)
    # the divergence is float64 rounded to float32 once, then one float32 product
    expected, bound = o_importance(b.double().numpy(), o.double().numpy())
    assert (np.abs(scores.double().numpy() - expected) <= bound + 1e-300).all()
    out = ArceeFusion().merge(b.clone(), [o.clone()], {}, CTX)
    flat = sorted(scores.reshape(-1).tolist())
    n = len(flat)
    if n:
        q1, med, q3 = (flat[k] for k in quantile_positions(n))
        threshold = f32(med + f32(1.5 * f32(q3 - q1)))
        keep = [s >= threshold for s in scores.reshape(-1).tolist()]
    else:
        keep = []
    expected = [f32(x + (f32(y - x) if k else 0.0 * f32(y - x))) for x, y, k in zip(base, other, keep)]
    assert_bits_equal(out, expected, shape)


def test_arcee_fusion_quartiles_are_exact_ranks():
    assert quantile_positions(1) == (0, 0, 0)
    assert quantile_positions(5) == (1, 2, 3)
    assert quantile_positions(8) == (1, 3, 5)  # ⌊7/4⌋, ⌊7/2⌋, ⌊21/4⌋
    n = 10**7 + 3  # beyond float32's integers: the ranks are computed exactly
    assert quantile_positions(n) == ((n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4)


def test_arcee_fusion_keeps_the_outlying_changes():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, 16, generator=gen)
    other = base + 0.01 * torch.randn(8, 16, generator=gen)
    other[3, 5] += 3.0  # one large change in one row
    out = ArceeFusion().merge(base.clone(), [other.clone()], {}, CTX)
    changed = (out != base)
    assert changed[3, 5] and int(changed.sum()) < 8 * 16 // 4
    assert torch.equal(out[changed], (base + (other - base))[changed])


# ---------------------------------------------------------------------------------------------
# passthrough


@given(inputs(max_models=1), st.one_of(st.none(), st.sampled_from([0.5, 2.0, -1.0, 0.0]), st.floats(-3, 3)))
def test_passthrough_copies_or_scales(data, scale):
    shape, _, (model,) = data
    out = Passthrough().merge(None, [tensor(model, shape)], {"scale": [scale]}, CTX)
    expected = model if scale is None else [f32(x * f32(scale)) for x in model]
    assert_bits_equal(out, expected, shape)


# ---------------------------------------------------------------------------------------------
# Declarations


@pytest.mark.parametrize("strategy,base,lo,hi,elementwise,required", [
    (Nearswap(), "required", 1, 1, True, {"t"}),
    (ArceeFusion(), "required", 1, 1, False, set()),
    (Ram(), "required", 1, None, True, set()),
    (RamPlusTL(), "required", 1, None, False, set()),
    (Passthrough(), "unused", 1, 1, True, set()),
])
def test_declarations(strategy, base, lo, hi, elementwise, required):
    assert (strategy.base, strategy.min_models, strategy.max_models) == (base, lo, hi)
    assert strategy.elementwise is elementwise and not strategy.random
    assert {p.name for p in strategy.parameters if p.required} == required
