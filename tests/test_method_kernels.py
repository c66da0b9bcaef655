"""The C kernels of the geometric and selective strategies against their torch twins: the vector
kernels (fusion.api.kernels.gram, .combination) against fusion.api.vectors, the distance blend
and changed-entry mean against nearswap's and RAM's references, and every compiled path against
its strategy's merge: the same combinations bit for bit, Gram matrices within float64 rounding,
results within one unit in the last place of the output dtype, and identical bytes whatever the
thread count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fusion
from fusion.api import kernels, vectors
from fusion.plugins.arcee_fusion import ArceeFusion
from fusion.plugins.model_stock import ModelStock
from fusion.plugins.nearswap import Nearswap
from fusion.plugins.passthrough import Passthrough
from fusion.plugins.ram import Ram, RamPlusTL
from fusion.plugins.slerp import Nuslerp, Slerp
from fusion.plugins.sphere_means import Karcher, Multislerp
from test_kernels import DTYPES, SPECIAL, assert_within_one_ulp, needs_c, ulps

shapes = st.one_of(st.lists(st.integers(0, 6), max_size=3).map(tuple),
                   st.sampled_from([(1, 700), (700, 1), (3, 1031), (257, 5)]))
finite = st.one_of(st.sampled_from([0.0, -0.0, 0.5, -1.0, 2.5, 1e-3]), st.floats(-4, 4, width=32))


@st.composite
def inputs(draw, count: int, specials: bool = False):
    """``count`` tensors of one shape and assorted dtypes: fresh values, zeros, multiples of the
    previous tensor (parallel and opposite vectors); specials (inf, NaN, subnormals) if asked."""
    shape = draw(shapes)
    n = math.prod(shape)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    element = st.one_of(st.sampled_from(SPECIAL), finite) if specials else finite
    pool = torch.tensor(draw(st.lists(element, min_size=1, max_size=10)), dtype=torch.float32)
    out: list[torch.Tensor] = []
    for _ in range(count):
        kind = draw(st.sampled_from(["fresh", "fresh", "zero", "multiple"]))
        if kind == "zero":
            x = torch.zeros(n)
        elif kind == "multiple" and out:
            x = out[-1].float() * draw(st.sampled_from([2.0, -1.0, 0.5]))
        else:
            x = pool[torch.randint(len(pool), (n,), generator=gen)] * torch.rand(n, generator=gen)
        out.append(x.to(draw(st.sampled_from(DTYPES))).reshape(shape))
    return shape, out


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous()


@needs_c
@given(st.integers(1, 4), st.booleans(), st.sampled_from(vectors.VECTORS), st.data())
def test_gram_matches_torch(m, with_base, layout, data):
    shape, xs = data.draw(inputs(m + 1))
    base, xs = (xs[0], xs[1:]) if with_base else (None, xs[1:])
    reference = vectors.gram([x.float() for x in xs], None if base is None else base.float(), layout)
    g = kernels.gram([flat(x) for x in xs], None if base is None else flat(base), shape=shape, vectors=layout)
    assert g.shape == reference.shape
    # float64 sums in another order: a few float64 ulps of the summed magnitudes
    scale = np.sqrt(np.einsum("vii->vi", np.abs(reference)))
    bound = 1e-13 * np.einsum("vi,vj->vij", scale, scale) + 1e-300
    assert (np.abs(g - reference) <= bound).all()


@needs_c
@given(st.integers(1, 4), st.booleans(), st.sampled_from(vectors.VECTORS), st.sampled_from(DTYPES), st.data())
def test_combination_matches_torch_bit_for_bit(m, with_base, layout, out_dtype, data):
    shape, xs = data.draw(inputs(m + 1, specials=True))
    base, xs = (xs[0], xs[1:]) if with_base else (None, xs[1:])
    count = vectors.vector_count(shape, layout)
    coef = np.array(data.draw(st.lists(st.one_of(st.sampled_from([0.0, 1.0, -1.0]), st.floats(-3, 3)),
                                       min_size=count * m, max_size=count * m))).reshape(count, m)
    expected = vectors.combination([x.float() for x in xs], coef, None if base is None else base.float(),
                                   layout).to(out_dtype)
    out = torch.empty(shape, dtype=out_dtype)
    bad = kernels.combination(flat(out), [flat(x) for x in xs], coef, None if base is None else flat(base),
                              shape=shape, vectors=layout)
    assert not bool((ulps(flat(out), flat(expected)) > 0).any())
    assert bad == int((~torch.isfinite(expected)).sum())


@needs_c
@pytest.mark.parametrize("layout,shape", [("tensor", (300_007,)), ("rows", (1201, 250)), ("columns", (701, 430))])
def test_vector_kernels_do_not_depend_on_the_thread_count(layout, shape):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(shape, generator=gen).to(torch.bfloat16)
    xs = [(base.float() + 0.01 * torch.randn(shape, generator=gen)).to(torch.bfloat16) for _ in range(3)]
    grams = [kernels.gram(xs, base, shape=shape, vectors=layout, threads=t) for t in (1, 2, 3)]
    assert all(np.array_equal(g.view(np.int64), grams[0].view(np.int64)) for g in grams)
    coef = np.random.default_rng(0).normal(size=(grams[0].shape[0], 3))
    outs = []
    for t in (1, 2, 3):
        out = torch.empty(shape, dtype=torch.bfloat16)
        kernels.combination(out, xs, coef, base, shape=shape, vectors=layout, threads=t)
        outs.append(out)
    assert all(torch.equal(o.view(torch.int16), outs[0].view(torch.int16)) for o in outs)


def test_vector_kernels_check_their_arguments():
    if not kernels.available():
        pytest.skip("the C extension is not built here")
    with pytest.raises(ValueError, match="does not have"):
        kernels.gram([torch.zeros(6)], shape=(2, 2))
    with pytest.raises(ValueError, match="vectors must be one of"):
        kernels.gram([torch.zeros(4)], shape=(2, 2), vectors="diagonal")
    with pytest.raises(ValueError):
        kernels.combination(torch.zeros(4), [torch.zeros(4), torch.zeros(4)], [1.0], shape=(4,))


# ---------------------------------------------------------------------------------------------
# The strategies' compiled paths


def compiled_and_reference(strategy, base, models, params, shape, out_dtype, threads=2):
    ctx = fusion.TensorContext("tensor", shape=shape)
    out = torch.empty(shape, dtype=out_dtype)
    bad = strategy.merge_compiled(flat(out), None if base is None else flat(base), [flat(m) for m in models],
                                  params, ctx, threads=threads, release=False)
    expected = strategy.merge(None if base is None else base.float().clone(),
                              [m.float().clone() for m in models], params, ctx).to(out_dtype)
    assert bad == int((~torch.isfinite(expected)).sum())
    return out, expected


ts = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.25, -0.5, 1.5]), st.floats(-1, 2))
weights = st.one_of(st.sampled_from([1.0, 0.5, 0.0, 2.0]), st.floats(0.05, 3))


@needs_c
@given(st.data(), st.sampled_from(DTYPES))
def test_compiled_geometric_strategies_equal_their_references(data, out_dtype):
    name = data.draw(st.sampled_from(["slerp", "nuslerp", "multislerp", "karcher", "model_stock", "passthrough"]))
    if name == "slerp":
        shape, (base, model) = data.draw(inputs(2, specials=data.draw(st.booleans())))
        cases = [(Slerp(), base, [model], {"t": data.draw(ts)})]
    elif name == "nuslerp":
        shape, xs = data.draw(inputs(3))
        params = {"weight": data.draw(st.lists(weights, min_size=2, max_size=2)),
                  "nuslerp_flatten": data.draw(st.booleans()), "nuslerp_row_wise": data.draw(st.booleans())}
        cases = [(Nuslerp(), data.draw(st.sampled_from([xs[0], None])), xs[1:], params)]
    elif name == "multislerp":
        m = data.draw(st.integers(1, 3))
        shape, xs = data.draw(inputs(m + 1))
        params = {"weight": data.draw(st.lists(weights, min_size=m, max_size=m)), "normalize_weights": True,
                  "eps": 1e-8}
        try:
            Multislerp().merge(None, [x.float() for x in xs[1:]], params, fusion.TensorContext("t"))
        except fusion.MergeError:
            return  # weights or directions that cancel: refused by both paths alike
        cases = [(Multislerp(), None, xs[1:], params)]
    elif name == "karcher":
        shape, xs = data.draw(inputs(data.draw(st.integers(1, 3))))
        cases = [(Karcher(), None, xs, {"max_iter": data.draw(st.sampled_from([0, 3, 10])), "tol": 1e-5})]
    elif name == "model_stock":
        shape, xs = data.draw(inputs(data.draw(st.integers(3, 4))))
        cases = [(ModelStock(), xs[0], xs[1:], {"filter_wise": data.draw(st.booleans())})]
    else:
        shape, (x,) = data.draw(inputs(1, specials=True))
        cases = [(Passthrough(), None, [x], {"scale": [data.draw(st.sampled_from([None, 0.5, -2.0]))]})]
    for strategy, base, models, params in cases:
        out, expected = compiled_and_reference(strategy, base, models, params, shape, out_dtype)
        assert_within_one_ulp(flat(out), flat(expected))


@needs_c
def test_compiled_endpoints_are_exact_copies():
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(1000, generator=gen).to(torch.bfloat16) for _ in range(2))
    a[0] = -0.0
    for t, expected in ((0.0, a), (1.0, b)):
        out, _ = compiled_and_reference(Slerp(), a, [b], {"t": t}, (1000,), torch.bfloat16)
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


# ---------------------------------------------------------------------------------------------
# nearswap, ram, ramplus_tl and arcee_fusion: float32 arithmetic as the references write it, so
# bit for bit (arcee_fusion's float64 divergences round to the same float32 but in rare cases)


@st.composite
def changes(draw, max_models: int = 4):
    """A base and models that change some of its entries, by amounts around a few epsilons."""
    shape, (base,) = draw(inputs(1, specials=draw(st.booleans())))
    n = base.numel()
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    models = []
    for _ in range(draw(st.integers(1, max_models))):
        step = torch.tensor(draw(st.lists(st.sampled_from([0.0, 1e-6, -2e-5, 1e-3, 0.25, -1.0]), min_size=1,
                                          max_size=6)))
        moved = base.float().reshape(-1) + step[torch.randint(len(step), (n,), generator=gen)]
        models.append(moved.to(draw(st.sampled_from(DTYPES))).reshape(shape))
    return shape, base, models


@needs_c
@given(changes(max_models=1), st.one_of(st.sampled_from([0.0, 1e-3, 0.5, -1.0, 1e9]), st.floats(-1, 4)),
       st.sampled_from(DTYPES))
def test_distance_blend_is_nearswap_bit_for_bit(case, t, out_dtype):
    shape, base, (other,) = case
    out, expected = compiled_and_reference(Nearswap(), base, [other], {"t": t}, shape, out_dtype)
    assert not bool((ulps(flat(out), flat(expected)) > 0).any())


@needs_c
@given(changes(), st.sampled_from([1e-5, 0.0, 1e-3, 0.3]), st.sampled_from(DTYPES))
def test_changed_mean_is_ram_bit_for_bit(case, epsilon, out_dtype):
    shape, base, models = case
    out, expected = compiled_and_reference(Ram(), base, models, {"epsilon": epsilon}, shape, out_dtype)
    assert not bool((ulps(flat(out), flat(expected)) > 0).any())


@needs_c
@given(changes(), st.sampled_from([1e-5, 1e-3, 0.3]), st.sampled_from([0.1, 0.0, -0.5, 2.0]),
       st.sampled_from([0.2, 0.0, 10.0]), st.sampled_from(DTYPES))
def test_ramplus_tl_compiled_is_its_reference_bit_for_bit(case, epsilon, r, alpha, out_dtype):
    shape, base, models = case
    params = {"r": r, "alpha": alpha, "epsilon": epsilon}
    out, expected = compiled_and_reference(RamPlusTL(), base, models, params, shape, out_dtype)
    assert not bool((ulps(flat(out), flat(expected)) > 0).any())


@needs_c
def test_change_counts_and_threads():
    gen = torch.Generator().manual_seed(2)
    n = 400_003
    base = torch.randn(n, generator=gen)
    models = [base + torch.where(torch.rand(n, generator=gen) < p, 0.01, 0.0) for p in (0.1, 0.3, 0.6)]
    changed = [(m - base).abs() > np.float32(1e-3) for m in models]
    count = sum(c.int() for c in changed)
    shared, unique = kernels.change_counts(base, models, 1e-3, threads=3)
    assert shared == [int((c & (count > 1)).sum()) for c in changed]
    assert unique == [int((c & (count == 1)).sum()) for c in changed]
    assert kernels.change_counts(base, models, 1e-3, threads=1) == (shared, unique)
    outs = []
    for threads in (1, 2, 3):
        out = torch.empty(n, dtype=torch.bfloat16)
        kernels.changed_mean(out, base, models, 1e-3, scales=[1.1, 1.2, 1.3], threads=threads)
        outs.append(out.view(torch.int16))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_c
@given(changes(max_models=1), st.sampled_from(DTYPES))
def test_kl_outlier_merge_is_arcee_fusion_bit_for_bit(case, out_dtype):
    shape, base, (other,) = case
    out, expected = compiled_and_reference(ArceeFusion(), base, [other], {}, shape, out_dtype)
    assert not bool((ulps(flat(out), flat(expected)) > 0).any())


@needs_c
@pytest.mark.parametrize("shape", [(3001, 200), (400_001,)])
def test_kl_outlier_merge_across_threads(shape):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(shape, generator=gen).to(torch.bfloat16)
    other = (base.float() + 0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    outs = [compiled_and_reference(ArceeFusion(), base, [other], {}, shape, torch.bfloat16, threads=t)
            for t in (1, 2, 3)]
    for out, expected in outs:
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
