"""The task-arithmetic family (task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
breadcrumbs_ties, della, della_linear) and fusion.api.sparsify against slow oracles written from
docs/strategies.md, element by element on Python floats.

The oracles round every float32 operation once (f32, and fma32 for task arithmetic's fused
multiply-adds), draw the random numbers with their own SplitMix64, rank by sorting (|δ|, index)
pairs and add the L1 norms per binary exponent, so masks, rescale factors and results must agree
exactly.
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fusion
from fusion.api import sparsify as sp
from fusion.api.random import stream_seed, uniform
from fusion.plugins.breadcrumbs import Breadcrumbs, BreadcrumbsTies
from fusion.plugins.dare import DareLinear, DareTies
from fusion.plugins.della import Della, DellaLinear
from fusion.plugins.task_arithmetic import TaskArithmetic
from fusion.plugins.ties import Ties
from test_strategies import (NONZERO_TIE_VALUES, f32, f32_sum, lambdas, merge_inputs, sign, slow_deltas,
                             slow_topk, tensor, weights_st)

FAMILY = [TaskArithmetic(), Ties(), DareLinear(), DareTies(), Breadcrumbs(), BreadcrumbsTies(), Della(),
          DellaLinear()]
BY_NAME = {s.name: s for s in FAMILY}
SEED = 0x5EED_F00D_1234_5678

# ---------------------------------------------------------------------------------------------
# Oracles

_MASK64 = (1 << 64) - 1


def slow_uniform(seed: int, index: int) -> float:
    """SplitMix64 of seed + (index + 1)·0x9E3779B97F4A7C15, top 24 bits, as fusion.api.random says."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 40) / 2 ** 24


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def fma32(a: float, b: float, c: float) -> float:
    """a·b + c rounded once to float32 (nearest even): the nearest of the float32 numbers around
    the double rounding of the exact value."""
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    if exact == 0:  # IEEE: −0 only for (−0) + (−0)
        product = a * b
        return -0.0 if product == 0 and c == 0 and math.copysign(1, product) < 0 > math.copysign(1, c) else 0.0
    guess = np.float32(float(exact))
    candidates = [guess, np.nextafter(guess, np.float32(np.inf)), np.nextafter(guess, np.float32(-np.inf))]
    return float(min(candidates, key=lambda x: (abs(Fraction(float(x)) - exact), f32_bits(float(x)) & 1)))


def descending(keys: list[float]) -> list[int]:
    """Indices from the largest |key| down; equal keys by lower index; NaN above every number."""
    return sorted(range(len(keys)), key=lambda j: (0, 0.0, j) if math.isnan(keys[j]) else (1, -abs(keys[j]), j))


def slow_mask(delta: list[float], shape: tuple, mode: str, density: float, gamma: float, epsilon: float,
              seed: int, start: int = 0) -> list[bool]:
    n = len(delta)
    if mode == "magnitude":
        k = 0 if density <= 0 or n == 0 else (n if density >= 1 else max(1, math.floor(density * n)))
        return slow_topk([abs(x) for x in delta], k)
    if mode == "random":
        return [slow_uniform(seed, start + j) < density for j in range(n)]
    if mode == "band":  # mergekit: sort ascending, keep positions [n_bot, n_bot + target)
        target, n_top = math.floor(density * n), math.floor(gamma * n)
        n_bot = max(0, n - target - n_top)
        ascending = descending(delta)[::-1]
        kept = set(ascending[n_bot:n_bot + target])
        return [j in kept for j in range(n)]
    assert mode == "ranked"
    if density <= 0:
        return [False] * n
    outer, length, inner = (1, n, 1) if len(shape) < 2 else (shape[0], shape[1], math.prod(shape[2:]))
    keep = [False] * n
    for a in range(outer):
        for r in range(inner):
            members = [(a * length + j) * inner + r for j in range(length)]
            order = descending([delta[m] for m in members])
            for q, local in enumerate(order):
                p = density if length == 1 else \
                    (density - epsilon) + ((length - 1 - q) / (length - 1)) * (2 * epsilon)
                keep[members[local]] = slow_uniform(seed, start + members[local]) < p
    return keep


def slow_abs_sum(values: list[float]) -> float:
    """Σ|x| over the finite values, exactly (Fractions), rounded once to float64."""
    exact = sum((Fraction(abs(x)) for x in values if math.isfinite(x)), Fraction(0))
    return float(exact)


def slow_sparsify(delta, shape, mode, density, gamma, epsilon, seed, rescale) -> list[float]:
    if mode == "none" or density >= 1:
        return delta
    keep = slow_mask(delta, shape, mode, density, gamma, epsilon, seed)
    masked = [x if k else 0.0 for x, k in zip(delta, keep)]
    before, after = slow_abs_sum(delta), slow_abs_sum(masked)
    if not rescale or before < 1e-7 or after < 1e-7:
        return masked
    factor = f32(before / after)
    return [f32(x * factor) if k else 0.0 for x, k in zip(delta, keep)]


def slow_family(strategy, shape, base, models, params, seed=SEED) -> list[float]:
    n = len(base)
    deltas = slow_deltas(base, models)
    weights = params["weight"]
    zeros = [0.0] * len(models)
    kept = [slow_sparsify(d, shape, strategy.sparsification, params["density"][i], params.get("gamma", zeros)[i],
                          params.get("epsilon", zeros)[i], stream_seed(seed, i), params["rescale"])
            for i, d in enumerate(deltas)]
    out = []
    for p in range(n):
        if strategy.consensus:
            x = [f32(f32(w) * k[p]) for w, k in zip(weights, kept)]
            elected = 1 if f32_sum(x) >= 0 else -1
            agree = [sign(v) == elected for v in x]
            total = f32_sum(v for v, a in zip(x, agree) if a)
            divisor = f32_sum(f32(w) for w, a in zip(weights, agree) if a) if params["normalize"] else 1.0
            value = f32(base[p] + f32(f32(params["lambda"]) * f32(total / (divisor or 1.0))))
        else:
            total = f32(kept[0][p] * f32(weights[0]))
            for w, k in zip(weights[1:], kept[1:]):
                total = fma32(k[p], f32(w), total)
            if params["normalize"]:
                divisor = sum(weights)
                total = f32(total / f32(divisor if abs(divisor) >= 1e-8 else 1.0))
            value = fma32(total, f32(params["lambda"]), base[p])
        if not all(math.isfinite(d[p]) for d in deltas):
            value = math.nan
        out.append(value)
    return out


# ---------------------------------------------------------------------------------------------
# Parameters

densities = st.one_of(st.sampled_from([1.0, 0.5, 0.1, 0.29, 0.7, 1e-9, 0.0]), st.floats(0.0, 1.0))
gammas = st.one_of(st.sampled_from([0.01, 0.0, 0.1, 0.5, 1.0]), st.floats(0.0, 1.0))


@st.composite
def della_pair(draw) -> tuple[float, float]:
    """(density, epsilon) that DELLA accepts: 0 < d ± ε < 1, or d at 0 or 1 (ε unused)."""
    d = draw(st.one_of(st.sampled_from([0.5, 0.3, 0.8, 0.0, 1.0]), st.floats(0.01, 0.99)))
    if d in (0.0, 1.0):
        return d, draw(st.sampled_from([0.15, 0.7]))
    return d, draw(st.floats(0.0, min(d, 1 - d), exclude_max=True).filter(lambda e: 0 < d - e and d + e < 1))


@st.composite
def family_params(draw, strategy, n_models: int) -> dict:
    per = lambda s: draw(st.lists(s, min_size=n_models, max_size=n_models))  # noqa: E731
    params = {"weight": per(weights_st), "lambda": draw(lambdas), "normalize": draw(st.booleans()),
              "rescale": draw(st.booleans()), "int8_mask": draw(st.booleans())}
    if strategy.sparsification == "ranked":
        pairs = per(della_pair())
        params["density"], params["epsilon"] = [p[0] for p in pairs], [p[1] for p in pairs]
    else:
        params["density"] = per(densities)
    if strategy.sparsification == "band":
        params["gamma"] = per(gammas)
    return params


def context(shape, n_models: int, seed: int = SEED) -> fusion.TensorContext:
    return fusion.TensorContext("t", shape=tuple(shape), seed=seed, models=tuple(f"m{i}" for i in range(n_models)))


def run(strategy, shape, base, models, params, seed=SEED) -> torch.Tensor:
    out = strategy.merge(tensor(base, shape), [tensor(m, shape) for m in models], params,
                         context(shape, len(models), seed))
    assert out.dtype == torch.float32 and out.shape == shape
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal, any NaN equal to any NaN."""
    na, nb = torch.isnan(a), torch.isnan(b)
    return a.shape == b.shape and torch.equal(na, nb) and torch.equal(
        torch.where(na, 0.0, a).view(torch.int32), torch.where(nb, 0.0, b).view(torch.int32))


# ---------------------------------------------------------------------------------------------
# The sparsifiers


@given(merge_inputs(max_models=1), st.sampled_from(["magnitude", "random", "band", "ranked"]), st.data())
def test_masks_match_oracle(inputs, mode, data):
    shape, base, (model,) = inputs
    delta = slow_deltas(base, [model])[0]
    if mode == "ranked":
        density, epsilon = data.draw(della_pair())
    else:
        density, epsilon = data.draw(densities), 0.0
    gamma = data.draw(gammas)
    seed = data.draw(st.integers(0, 2 ** 64 - 1))
    t = tensor(delta, shape)
    mask = {"magnitude": lambda: sp.magnitude_mask(t, density),
            "random": lambda: sp.random_mask(t, density, seed),
            "band": lambda: sp.band_mask(t, density, gamma),
            "ranked": lambda: sp.ranked_mask(t, density, epsilon, seed)}[mode]()
    assert mask.dtype == torch.bool and mask.shape == shape
    assert mask.reshape(-1).tolist() == slow_mask(delta, shape, mode, density, gamma, epsilon, seed)


@given(st.lists(st.one_of(st.floats(-8, 8, width=32), st.sampled_from([1e-40, -3e-45, 3e38, -0.0])),
                max_size=80), st.randoms())
def test_abs_sum_is_exact_and_order_free(values, rng):
    values = [f32(v) for v in values]
    t = torch.tensor(values, dtype=torch.float32)
    total = sp.abs_sum(t)
    assert total == slow_abs_sum(values)
    shuffled = list(values)
    rng.shuffle(shuffled)
    assert sp.abs_sum(torch.tensor(shuffled, dtype=torch.float32)) == total
    assert total == math.fsum(abs(v) for v in values)  # fsum is correctly rounded too


def test_abs_sum_leaves_out_non_finite_entries():
    t = torch.tensor([1.0, float("nan"), -2.0, float("inf"), float("-inf")])
    assert sp.abs_sum(t) == 3.0


def test_uniform_is_splitmix64_and_chunks_agree():
    seed = stream_seed(SEED, 3)
    whole = uniform(seed, 0, 100).tolist()
    assert whole == [slow_uniform(seed, i) for i in range(100)]
    assert uniform(seed, 37, 20).tolist() == whole[37:57]
    assert stream_seed(SEED, 0) != stream_seed(SEED, 1) and stream_seed(SEED, 0) == stream_seed(SEED, 0)


@pytest.mark.parametrize("n,density,gamma,expected", [
    (20, 0.5, 0.1, (2, 10)),   # drop the 2 largest, keep the next 10, drop the 8 smallest
    (20, 0.9, 0.2, (2, 18)),   # d + γ > 1: only n − ⌊d·n⌋ = 2 outliers can go
    (20, 0.5, 0.0, (0, 10)),
    (20, 0.01, 0.1, (2, 0)),   # ⌊d·n⌋ = 0 keeps nothing (no "at least one")
    (7, 0.29, 1.0, (5, 2)),
])
def test_band_bounds(n, density, gamma, expected):
    assert sp.band_bounds(density, gamma, n) == expected


def test_breadcrumbs_band_on_magnitudes_one_to_twenty():
    """|δ| = 1..20 (mergekit's verified cases): d .5 γ .1 keeps 9..18; d .9 γ .2 keeps 1..18."""
    delta = torch.arange(1.0, 21.0)
    kept = lambda d, g: (delta[sp.band_mask(delta, d, g)]).tolist()  # noqa: E731
    assert kept(0.5, 0.1) == [float(v) for v in range(9, 19)]
    assert kept(0.9, 0.2) == [float(v) for v in range(1, 19)]
    assert kept(0.5, 0.0) == [float(v) for v in range(11, 21)]


def test_magnitude_keeps_at_least_one_entry():
    delta = torch.tensor([0.5, -2.0, 1.0])
    assert sp.magnitude_mask(delta, 0.001).tolist() == [False, True, False]
    assert not sp.magnitude_mask(delta, 0.0).any()
    assert sp.magnitude_count(0.57, 100) == 56  # floor of the float64 product


def test_della_keep_probabilities_rise_with_rank_within_each_row():
    delta = torch.tensor([[3.0, -1.0, 2.0, 0.0], [0.0, 0.0, 5.0, -5.0]])
    p = sp.keep_probabilities(delta, 0.5, 0.1)
    # row 0: ranks 4, 2, 3, 1 → ρ = 1, 1/3, 2/3, 0; row 1: equal |δ| rank the lower index higher
    assert p[0].tolist() == pytest.approx([0.6, 0.4 + 0.2 / 3, 0.4 + 0.4 / 3, 0.4])
    assert p[1].tolist() == pytest.approx([0.4 + 0.2 / 3, 0.4, 0.6, 0.4 + 0.4 / 3])
    assert sp.keep_probabilities(torch.tensor([[7.0], [1.0]]), 0.3, 0.1).tolist() == [[0.3], [0.3]]


def test_seeded_masks_keep_the_expected_fraction():
    delta = torch.randn(400, 300, generator=torch.Generator().manual_seed(1))
    dare = sp.random_mask(delta, 0.3, 42)
    assert abs(float(dare.float().mean()) - 0.3) < 0.01
    della = sp.ranked_mask(delta, 0.5, 0.1, 42)
    assert abs(float(della.float().mean()) - 0.5) < 0.01
    order = delta.abs().argsort(dim=1)
    rate = della.float().gather(1, order).mean(0)  # keep rate by rank, smallest first
    assert float(rate[:60].mean()) == pytest.approx(0.42, abs=0.02)
    assert float(rate[-60:].mean()) == pytest.approx(0.58, abs=0.02)
    assert not torch.equal(dare, sp.random_mask(delta, 0.3, 43))


def test_rescale_restores_the_l1_norm():
    delta = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    kept = sp.sparsify(delta, "random", 0.2, seed=5, rescale=True)
    assert math.isclose(float(kept.abs().double().sum()), float(delta.abs().double().sum()), rel_tol=1e-6)
    # below 1e-7 (before or after the mask) nothing is rescaled
    tiny = torch.full((10,), 1e-9)
    unscaled = torch.where(sp.magnitude_mask(tiny, 0.5), tiny, 0.0)
    assert torch.equal(sp.sparsify(tiny, "magnitude", 0.5, rescale=True), unscaled)
    # d ≥ 1 is the identity, rescale or not
    assert sp.sparsify(delta, "ranked", 1.0, epsilon=0.7, rescale=True) is delta


# ---------------------------------------------------------------------------------------------
# The merges


@given(st.sampled_from(sorted(BY_NAME)), merge_inputs(), st.data())
def test_family_matches_oracle(name, inputs, data):
    strategy = BY_NAME[name]
    shape, base, models = inputs
    params = data.draw(family_params(strategy, len(models)))
    out = run(strategy, shape, base, models, params)
    expected = tensor(slow_family(strategy, shape, base, models, params), shape)
    assert same(out, expected), f"{name}: {out} != {expected}"


@given(merge_inputs(), st.data())
def test_density_one_reduces_the_family_to_its_deterministic_forms(inputs, data):
    """At d = 1 nothing is dropped or rescaled: the DARE, breadcrumbs and DELLA variants equal
    task_arithmetic (no election) or TIES at d = 1 (election), whatever the seed, γ and ε."""
    shape, base, models = inputs
    n = len(models)
    shared = {"weight": data.draw(st.lists(weights_st, min_size=n, max_size=n)), "density": [1.0] * n,
              "lambda": data.draw(lambdas), "normalize": data.draw(st.booleans()), "rescale": True,
              "gamma": [0.3] * n, "epsilon": [0.7] * n}
    seed = data.draw(st.integers(0, 2 ** 64 - 1))
    plain = run(TaskArithmetic(), shape, base, models, shared, seed)
    elected = run(Ties(), shape, base, models, shared, seed)
    for strategy in FAMILY[2:]:
        assert same(run(strategy, shape, base, models, shared, seed), elected if strategy.consensus else plain), \
            strategy.name


@given(st.sampled_from(["dare_linear", "dare_ties", "della", "della_linear"]), merge_inputs(min_models=2),
       st.data())
def test_seeded_results_depend_on_the_seed_only(name, inputs, data):
    strategy = BY_NAME[name]
    shape, base, models = inputs
    params = data.draw(family_params(strategy, len(models)))
    seed = data.draw(st.integers(0, 2 ** 64 - 1))
    assert same(run(strategy, shape, base, models, params, seed), run(strategy, shape, base, models, params, seed))


def test_models_draw_different_streams():
    base = torch.zeros(2000)
    delta = torch.ones(2000)
    params = {"weight": [1.0, 1.0], "density": [0.5, 0.5], "rescale": False}
    out = DareLinear().merge(base, [delta.clone(), delta.clone()], params, context((2000,), 2))
    # the same stream would give only 0 and 2; independent ones give 1 about half the time
    assert 800 < int((out == 1).sum()) < 1200


@pytest.mark.parametrize("name", sorted(BY_NAME))
@pytest.mark.parametrize("where", ["base", "model"])
def test_a_non_finite_input_gives_a_non_finite_result(name, where):
    """An input NaN is never replaced by the base value, even where the rule drops the entry."""
    strategy = BY_NAME[name]
    base, models = torch.zeros(6), [torch.tensor([1.0, -2.0, 3.0, 0.5, 0.25, 4.0]), torch.full((6,), 0.5)]
    (base if where == "base" else models[0])[1] = float("nan")
    models[1][4] = float("inf")
    params = {"weight": [1.0, 0.5], "density": [0.2, 0.2], "gamma": [0.4, 0.4], "epsilon": [0.1, 0.1]}
    out = strategy.merge(base, models, params, context((6,), 2))
    assert torch.isnan(out[1]) and not torch.isfinite(out[4])
    assert torch.isfinite(out[[0, 2, 3, 5]]).all()


def test_ties_keeps_at_least_one_entry_per_task_vector():
    out = Ties().merge(torch.zeros(50), [tensor(NONZERO_TIE_VALUES * 4 + [9.0] * 2, (50,))],
                       {"weight": [1.0], "density": [0.001]}, context((50,), 1))
    assert int(torch.count_nonzero(out)) == 1 and float(out[48]) == 9.0


def test_negative_weight_flips_the_vote():
    """δ = [1, 2]·(w = 1, −3): D = (1, −6), only model 2 agrees, Δ = −6 / −3 = 2."""
    out = Ties().merge(torch.zeros(1), [torch.tensor([1.0]), torch.tensor([2.0])],
                       {"weight": [1.0, -3.0]}, context((1,), 2))
    assert out.tolist() == [2.0]


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_seeded_strategies_declare_it(name):
    assert BY_NAME[name].random and not BY_NAME[name].elementwise


# ---------------------------------------------------------------------------------------------
# Declarations


@pytest.mark.parametrize("name,normalize,rescale,extra", [
    ("task_arithmetic", False, False, None), ("ties", True, False, None),
    ("dare_linear", False, True, None), ("dare_ties", False, True, None),
    ("breadcrumbs", False, False, ("gamma", 0.01)), ("breadcrumbs_ties", False, False, ("gamma", 0.01)),
    ("della_linear", False, True, ("epsilon", 0.15)), ("della", True, True, ("epsilon", 0.15)),
])
def test_mergekit_parameter_set_and_defaults(name, normalize, rescale, extra):
    strategy = BY_NAME[name]
    declared = {p.name: p for p in strategy.parameters}
    expected = {"weight", "density", "lambda", "normalize", "rescale", "int8_mask"}
    expected |= {extra[0]} if extra else set()
    assert set(declared) == expected
    assert declared["normalize"].default is normalize and declared["rescale"].default is rescale
    assert declared["density"].default == 1.0 and declared["lambda"].default == 1.0
    assert declared["int8_mask"].default is False and declared["weight"].per_model
    if extra:
        assert declared[extra[0]].default == extra[1] and declared[extra[0]].per_model
    assert strategy.base == "required" and strategy.paper.startswith("https://arxiv.org/abs/")


@pytest.mark.parametrize("name,param,value", [
    ("dare_ties", "density", 1.01), ("dare_ties", "density", -0.1), ("breadcrumbs", "gamma", -0.01),
    ("breadcrumbs_ties", "gamma", 1.5), ("della", "epsilon", -0.1), ("ties", "int8_mask", 2),
])
def test_nonsense_values_are_refused(name, param, value):
    with pytest.raises(fusion.ConfigError, match=param):
        BY_NAME[name].param(param).check(value, f"parameters.{param}")


def test_int8_mask_changes_nothing():
    gen = torch.Generator().manual_seed(3)
    base, models = torch.randn(64, generator=gen), [torch.randn(64, generator=gen) for _ in range(3)]
    for strategy in FAMILY:
        params = {"weight": [0.5, 1.0, -0.25], "density": [0.5] * 3}
        with_mask = strategy.merge(base.clone(), [m.clone() for m in models], {**params, "int8_mask": True},
                                   context((64,), 3))
        without = strategy.merge(base.clone(), [m.clone() for m in models], params, context((64,), 3))
        assert same(with_mask, without), strategy.name


@pytest.mark.parametrize("density,epsilon,ok", [
    (0.5, 0.15, True), (0.9, 0.15, False), (0.15, 0.15, False), (0.85, 0.15, False),
    (1.0, 0.6, True), (0.0, 0.6, True), (0.3, 0.0, True),
])
def test_della_epsilon_rule(density, epsilon, ok):
    problems = Della().check({"density": [0.5, density], "epsilon": [0.1, epsilon]}, context((4,), 2))
    assert (problems == []) is ok
    if not ok:
        (problem,) = problems
        assert problem.startswith("m1: density") and "(0, 1)" in problem


def test_della_reports_every_model_that_breaks_the_rule():
    problems = Della().check({"density": [0.1, 0.5], "epsilon": [0.15, 0.6]}, context((4,), 2))
    assert [p.split(":")[0] for p in problems] == ["m0", "m1"], problems
