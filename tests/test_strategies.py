"""Property tests of the tensor strategies and of fusion.api.selection against slow oracles.

The oracles below are written from docs/strategies.md, element by element
on Python floats. They emulate float32 arithmetic with f32() (one rounding per operation, models
summed 1..N as the formulas are written), so discrete decisions (which entries are kept, which
sign is elected) must agree exactly, and so must TIES' values. SCE and VaRM weigh models by sums
of squares over the whole tensor, which torch adds in a different (pairwise) order; their values
are compared at a tolerance of a few float32 ulps of the inputs' scale.

Values are drawn mostly from a tiny set of bf16-rounded numbers, so exact ties, zeros, -0.0,
all-zero task vectors and exactly cancelling sums are common.
"""

from __future__ import annotations

import math
import struct
from typing import Sequence

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import fusion
from fusion.plugins import sce as sce_module
from fusion.plugins import ties as ties_module
from fusion.plugins import varm as varm_module
from fusion.plugins.linear import Linear
from fusion.plugins.sce import Sce
from fusion.plugins.task_arithmetic import TaskArithmetic
from fusion.plugins.ties import Ties
from fusion.plugins.varm import Varm
from fusion.api.selection import topk_count, topk_mask

CTX = fusion.TensorContext("tensor")

# ---------------------------------------------------------------------------------------------
# Oracles


def f32(x: float) -> float:
    """Round a Python float to float32 (round to nearest even, as torch's cast)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def f32_sum(values) -> float:
    total = 0.0
    for v in values:
        total = f32(total + v)
    return total


def sign(x: float) -> int:
    return (x > 0) - (x < 0)


def slow_topk(keys: Sequence[float], k: int) -> list[bool]:
    """Largest keys first, lower index first among equal keys: sort (−key, index) pairs."""
    ranked = sorted((-key, index) for index, key in enumerate(keys))
    kept = {index for _, index in ranked[:k]}
    return [index in kept for index in range(len(keys))]


def slow_deltas(base: list[float], models: list[list[float]]) -> list[list[float]]:
    return [[f32(t - b) for t, b in zip(model, base)] for model in models]


def slow_variance(deltas: list[list[float]]) -> list[float]:
    """Population variance over models at each position, in float64, rounded to float32."""
    n_models = len(deltas)
    out = []
    for p in range(len(deltas[0])):
        column = [d[p] for d in deltas]
        mean = sum(column) / n_models
        out.append(f32(sum((x - mean) * (x - mean) for x in column) / n_models))
    return out


def slow_sce(base, models, tau, scope, lam) -> list[float]:
    n, n_models = len(base), len(models)
    deltas = slow_deltas(base, models)
    if tau < 1:
        variance = slow_variance(deltas)
        k = math.floor(tau * sum(1 for v in variance if v != 0))
        selected = slow_topk(variance, k)
    else:
        selected = [True] * n
    in_selection = [[x if s else 0.0 for x, s in zip(d, selected)] for d in deltas]
    if scope == "all":
        deltas = in_selection
    energies = [sum(x * x for x in d) for d in in_selection]
    total_energy = sum(energies)
    etas = [e / total_energy for e in energies] if total_energy != 0 else [1 / n_models] * n_models
    out = []
    for p in range(n):
        elected = 1 if f32_sum(d[p] for d in deltas) >= 0 else -1
        agree = [sign(d[p]) == elected for d in deltas]
        total = f32_sum(f32(f32(eta) * d[p]) for eta, d, a in zip(etas, deltas, agree) if a)
        divisor = f32_sum(f32(eta) for eta, a in zip(etas, agree) if a)
        if divisor == 0:
            divisor = 1.0
        out.append(f32(base[p] + f32(f32(lam) * f32(total / divisor))))
    return out


def slow_varm(base, models) -> list[float]:
    n, n_models = len(base), len(models)
    deltas = slow_deltas(base, models)
    variations = [sum(x * x for x in d) / max(n, 1) for d in deltas]
    total = sum(variations)
    weights = [v / total for v in variations] if total != 0 else [1 / n_models] * n_models
    return [f32(base[p] + f32_sum(f32(f32(w) * d[p]) for w, d in zip(weights, deltas)))
            for p in range(n)]


# ---------------------------------------------------------------------------------------------
# Data

# bf16-rounded, so that differences and sums of a few of them (times the dyadic weights below)
# are exact in float32 and ties abound.
TIE_VALUES = sorted(set(
    torch.tensor([0.0, 0.1, -0.1, 0.3, -0.3, 1.0, -1.0, 2.5, -2.5, 1e-3, -1e-3, 0.5, 7.0],
                 dtype=torch.bfloat16).float().tolist()
)) + [-0.0]
NONZERO_TIE_VALUES = [v for v in TIE_VALUES if v != 0]
DYADIC_WEIGHTS = [1.0, -1.0, 0.5, 2.0, 0.25, 0.0, -0.5]

fractions = st.one_of(
    st.sampled_from([1.0, 0.5, 0.1, 0.29, 0.7, 1e-9]),
    st.floats(0.0, 1.0, exclude_min=True),
)
# ±1e-9: a divisor that is tiny but not 0 must be used as it is.
weights_st = st.one_of(st.sampled_from(DYADIC_WEIGHTS + [1e-9, -1e-9]),
                       st.floats(-3.0, 3.0, width=32))
lambdas = st.one_of(st.sampled_from([1.0, 0.0, -1.0, 0.5]), st.floats(-2.0, 2.0, width=32))
shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple)


def values(wide: bool) -> st.SearchStrategy[float]:
    if wide:
        return st.floats(-8.0, 8.0, width=32, allow_subnormal=False)
    return st.sampled_from(TIE_VALUES)


@st.composite
def merge_inputs(draw, max_models: int = 4, wide: bool | None = None, min_models: int = 1):
    """(shape, base, models): flat Python lists of float32 values. Besides fresh models, some
    equal the base (δ = 0), mirror an earlier one (δ = −δⱼ: signed sums cancel exactly) or
    share some of an earlier one's entries (δ = δⱼ there: zero variance)."""
    shape = draw(shapes)
    n = math.prod(shape)
    elements = values(draw(st.booleans()) if wide is None else wide)
    base = draw(st.lists(elements, min_size=n, max_size=n))
    models: list[list[float]] = []
    for _ in range(draw(st.integers(min_models, max_models))):
        fresh = draw(st.lists(elements, min_size=n, max_size=n))
        kind = draw(st.sampled_from(["fresh", "fresh", "base", "mirror", "sibling"]))
        if kind == "base":
            models.append(list(base))
        elif kind == "mirror" and models:
            other = draw(st.sampled_from(models))
            models.append([f32(2 * b - t) for b, t in zip(base, other)])
        elif kind == "sibling" and models:
            other = draw(st.sampled_from(models))
            shared = draw(st.lists(st.booleans(), min_size=n, max_size=n))
            models.append([t if keep else x for t, x, keep in zip(other, fresh, shared)])
        else:
            models.append(fresh)
    return shape, base, models


def tensor(values: Sequence[float], shape: tuple) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32).reshape(shape)


def run(strategy: fusion.Strategy, shape, base, models, params) -> torch.Tensor:
    # Fresh tensors on every call: strategies may work in place on the host's copies.
    out = strategy.merge(tensor(base, shape), [tensor(m, shape) for m in models], params, CTX)
    assert out.dtype == torch.float32 and out.shape == shape
    return out


def assert_scaled_close(actual: torch.Tensor, expected: list[float], shape, *inputs) -> None:
    """Within a few float32 ulps of the largest input (the model weights are float64 sums)."""
    scale = max([1.0] + [abs(x) for xs in inputs for x in xs])
    torch.testing.assert_close(actual, tensor(expected, shape), rtol=1e-6, atol=1e-6 * scale)


# ---------------------------------------------------------------------------------------------
# fusion.api.selection


@given(st.data())
def test_topk_mask_matches_sorting_oracle(data):
    shape = data.draw(shapes)
    n = math.prod(shape)
    keys = data.draw(st.lists(st.one_of(st.sampled_from([abs(v) for v in TIE_VALUES] + [-0.0]),
                                        st.floats(0.0, 4.0, width=32)), min_size=n, max_size=n))
    k = data.draw(st.integers(0, n))
    mask = topk_mask(tensor(keys, shape), k)
    assert mask.dtype == torch.bool and mask.shape == shape
    assert int(mask.sum()) == k
    assert mask.reshape(-1).tolist() == slow_topk(keys, k)


@pytest.mark.parametrize("keys,k,expected", [
    ([2.0, 1.0, 2.0, 2.0], 2, [True, False, True, False]),
    ([0.0, -0.0, 0.0], 2, [True, True, False]),
    ([-0.0, 0.0, 1.0], 2, [True, False, True]),
    ([5.0], 1, [True]),
    ([5.0], 0, [False]),
    ([], 0, []),
])
def test_topk_mask_edge_cases(keys, k, expected):
    assert topk_mask(torch.tensor(keys, dtype=torch.float32), k).tolist() == expected


def test_topk_mask_zero_dim():
    assert topk_mask(torch.tensor(3.0), 1).shape == ()
    assert bool(topk_mask(torch.tensor(3.0), 1)) is True
    assert bool(topk_mask(torch.tensor(3.0), 0)) is False


def test_topk_mask_rejects_impossible_k():
    with pytest.raises(ValueError):
        topk_mask(torch.zeros(3), 4)
    with pytest.raises(ValueError):
        topk_mask(torch.zeros(3), -1)


def test_topk_mask_nan_ranks_first_and_count_stays_exact():
    nan = float("nan")
    keys = torch.tensor([1.0, nan, 3.0, nan, 3.0])
    assert topk_mask(keys, 1).tolist() == [False, True, False, False, False]
    assert topk_mask(keys, 3).tolist() == [False, True, True, True, False]
    assert int(topk_mask(keys, 4).sum()) == 4


def test_topk_mask_does_not_sort(monkeypatch):
    def no_sorting(*args, **kwargs):
        raise AssertionError("topk_mask must select, not sort")

    for name in ("sort", "argsort", "topk"):
        monkeypatch.setattr(torch, name, no_sorting)
        monkeypatch.setattr(torch.Tensor, name, no_sorting)
    keys = torch.tensor([0.5, 0.0, 0.5, 1.0, 0.5, 0.25] * 50)
    assert int(topk_mask(keys, 120).sum()) == 120


@given(fractions, st.integers(0, 10_000))
def test_topk_count_is_floor_of_float_product(fraction, n):
    assert topk_count(fraction, n) == math.floor(fraction * n)


def test_topk_count_floors_the_float_product():
    assert topk_count(0.29, 100) == 28  # 0.29 · 100 = 28.999999999999996 in float64
    assert topk_count(1.0, 7) == 7


# ---------------------------------------------------------------------------------------------
# sce


@given(merge_inputs(), fractions, st.sampled_from(["all", "weights"]), lambdas)
def test_sce_matches_oracle(inputs, tau, scope, lam):
    shape, base, models = inputs
    params = {"select_topk": tau, "select_scope": scope, "lambda": lam}
    out = run(Sce(), shape, base, models, params)
    assert_scaled_close(out, slow_sce(base, models, tau, scope, lam), shape, base, *models)


@given(st.data(), fractions)
def test_sce_selects_exactly_floor_tau_nonzero_variance_entries(data, tau):
    # Model 1 moves every entry; model 2 stays at the base (variance δ²/4 > 0) or moves with
    # model 1 (variance 0, never selected). Model 1 always agrees with the elected sign, so with
    # select_scope "all" Δ is non-zero exactly on S.
    n = data.draw(st.integers(0, 60))
    delta = data.draw(st.lists(st.sampled_from(NONZERO_TIE_VALUES), min_size=n, max_size=n))
    varies = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    base = torch.zeros(n)
    model_2 = tensor([0.0 if v else d for d, v in zip(delta, varies)], (n,))
    params = {"select_topk": tau, "select_scope": "all", "lambda": 1.0}
    out = Sce().merge(base, [tensor(delta, (n,)), model_2], params, CTX)
    expected = math.floor(tau * sum(varies)) if tau < 1 else n
    assert int(torch.count_nonzero(out)) == expected


@given(merge_inputs(max_models=1, min_models=1), st.integers(1, 4),
       st.sampled_from(["all", "weights"]))
def test_sce_full_selection_of_equal_deltas_returns_base_plus_delta(inputs, n_models, scope):
    shape, base, (model,) = inputs
    base_t, theta = tensor(base, shape), tensor(model, shape)
    out = Sce().merge(base_t.clone(), [theta.clone() for _ in range(n_models)],
                      {"select_topk": 1.0, "select_scope": scope, "lambda": 1.0}, CTX)
    torch.testing.assert_close(out, base_t + (theta - base_t))


@pytest.mark.parametrize("small", [1e-3, 1e-4])
def test_sce_weights_small_real_deltas_instead_of_falling_back_to_uniform(small):
    base = torch.zeros(4)
    deltas = [torch.full((4,), small), torch.full((4,), 3 * small)]
    out = Sce().merge(base, [base + d for d in deltas],
                      {"select_topk": 1.0, "select_scope": "all", "lambda": 1.0}, CTX)
    # η = (1/10, 9/10): Δ = (0.1·δ₁ + 0.9·δ₂) / (0.1 + 0.9) = 2.8·small; uniform would give 2·small.
    torch.testing.assert_close(out, torch.full((4,), 2.8 * small))


# ---------------------------------------------------------------------------------------------
# varm


@given(merge_inputs())
def test_varm_matches_oracle(inputs):
    shape, base, models = inputs
    out = run(Varm(), shape, base, models, {})
    assert_scaled_close(out, slow_varm(base, models), shape, base, *models)


# ---------------------------------------------------------------------------------------------
# Identities shared by the strategies


@given(merge_inputs(wide=False), st.data())
def test_all_zero_task_vectors_give_the_base(inputs, data):
    shape, base, models = inputs
    n_models = len(models)
    models = [list(base)] * n_models
    per_model = lambda s: data.draw(st.lists(s, min_size=n_models, max_size=n_models))  # noqa: E731
    cases = [
        (Ties(), {"weight": per_model(weights_st), "density": per_model(fractions),
                  "lambda": data.draw(lambdas), "normalize": data.draw(st.booleans())}),
        (Sce(), {"select_topk": data.draw(fractions),
                 "select_scope": data.draw(st.sampled_from(["all", "weights"])),
                 "lambda": data.draw(lambdas)}),
        (Varm(), {}),
    ]
    for strategy, params in cases:
        torch.testing.assert_close(run(strategy, shape, base, models, params), tensor(base, shape),
                                   rtol=0, atol=0)


@given(merge_inputs(wide=False, min_models=2), st.data())
def test_model_order_does_not_matter(inputs, data):
    shape, base, models = inputs
    n_models = len(models)
    order = data.draw(st.permutations(range(n_models)))
    per_model = lambda s: data.draw(st.lists(s, min_size=n_models, max_size=n_models))  # noqa: E731
    weights = per_model(st.sampled_from(DYADIC_WEIGHTS))
    assume(sum(weights) != 0)  # linear with normalize rejects weights summing to 0
    cases = [
        (Linear(), {"weight": weights, "normalize": data.draw(st.booleans())}),
        (TaskArithmetic(), {"weight": weights, "lambda": data.draw(lambdas),
                            "normalize": data.draw(st.booleans())}),
        (Ties(), {"weight": weights, "density": per_model(fractions), "lambda": data.draw(lambdas),
                  "normalize": data.draw(st.booleans())}),
        (Sce(), {"select_topk": data.draw(fractions),
                 "select_scope": data.draw(st.sampled_from(["all", "weights"])),
                 "lambda": data.draw(lambdas)}),
        (Varm(), {}),
    ]
    for strategy, params in cases:
        permuted = {name: [value[i] for i in order] if isinstance(value, list) else value
                    for name, value in params.items()}
        straight = run(strategy, shape, base, models, params)
        shuffled = run(strategy, shape, base, [models[i] for i in order], permuted)
        torch.testing.assert_close(shuffled, straight, msg=lambda m: f"{strategy.name}: {m}")


@given(merge_inputs(max_models=3))
def test_declared_defaults_are_accepted_by_merge(inputs):
    shape, base, models = inputs
    for strategy in (Ties(), Sce(), Varm()):
        params = {}
        for p in strategy.parameters:
            value = p.check(p.default, p.name)
            params[p.name] = [value] * len(models) if p.per_model else value
        run(strategy, shape, base, models, params)


# ---------------------------------------------------------------------------------------------
# Declarations and registration


@pytest.mark.parametrize("strategy,name,value", [
    (Ties(), "density", 1.5),
    (Ties(), "density", -0.1),
    (Ties(), "normalize", 0.5),  # 1.0, 0 and "yes" are booleans, as mergekit reads them
    (Ties(), "weight", "heavy"),
    (Sce(), "select_topk", 0),
    (Sce(), "select_topk", 1.01),
    (Sce(), "select_scope", "everything"),
    (Sce(), "lambda", float("nan")),
])
def test_invalid_params_are_rejected(strategy, name, value):
    path = f"models[0].parameters.{name}"
    with pytest.raises(fusion.ConfigError) as raised:
        strategy.param(name).check(value, path)
    assert path in str(raised.value)


@pytest.mark.parametrize("strategy,name,value", [
    (Ties(), "density", 1),
    (Ties(), "density", 0.01),
    (Ties(), "density", 0.0),
    (Ties(), "weight", -2),
    (Ties(), "normalize", 1.0),
    (Ties(), "normalize", 0),
    (Sce(), "select_topk", 1.0),
    (Sce(), "select_topk", 0.1),
    (Sce(), "select_scope", "weights"),
])
def test_valid_params_are_accepted(strategy, name, value):
    assert strategy.param(name).check(value, name) == value


@pytest.mark.parametrize("module,name,params", [
    (ties_module, "ties", {"weight", "density", "lambda", "normalize", "rescale", "int8_mask"}),
    (sce_module, "sce", {"select_topk", "select_scope", "lambda", "weight", "int8_mask"}),
    (varm_module, "varm", set()),
])
def test_plugin_registers_its_strategy(module, name, params):
    registered: list = []
    module.register_strategies(register=registered.append)
    (strategy,) = registered
    assert isinstance(strategy, fusion.Strategy)
    assert strategy.name == name and strategy.description and strategy.base == "required"
    assert strategy.paper.startswith("https://arxiv.org/abs/")
    assert {p.name for p in strategy.parameters} == params
    assert strategy.describe()["name"] == name
