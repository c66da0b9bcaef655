"""The task-arithmetic family's compiled path (fusion.api.kernels.sparsified_merge) against the
torch reference: the same keep masks (fusion.api.sparsify), the same rescale factors, the same
results (the arithmetic is float32 in the reference's order, so exactly the same), whatever the
threads; NaN and infinities included."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fusion
from fusion.api import kernels
from fusion.api import sparsify as sp
from fusion.api.random import stream_seed
from fusion.plugins.breadcrumbs import Breadcrumbs, BreadcrumbsTies
from fusion.plugins.dare import DareLinear, DareTies
from fusion.plugins.della import Della, DellaLinear
from fusion.plugins.ties import Ties
from test_kernels import inputs, needs_c, ulps
from test_task_vectors import family_params

SPARSE = {s.name: s for s in (Ties(), DareLinear(), DareTies(), Breadcrumbs(), BreadcrumbsTies(), Della(),
                              DellaLinear())}


def reference_masks(strategy, base, models, params, context) -> list[torch.Tensor]:
    out = []
    for i, m in enumerate(models):
        delta = (m.float() - base.float()).reshape(context.shape)
        d = params["density"][i]
        seed = stream_seed(context.seed, i)
        if d >= 1:
            mask = torch.ones(delta.shape, dtype=torch.bool)
        elif strategy.sparsification == "magnitude":
            mask = sp.magnitude_mask(delta, d)
        elif strategy.sparsification == "band":
            mask = sp.band_mask(delta, d, params["gamma"][i])
        elif strategy.sparsification == "random":
            mask = sp.random_mask(delta, d, seed)
        else:
            mask = sp.ranked_mask(delta, d, params["epsilon"][i], seed)
        out.append(mask.reshape(-1))
    return out


def compiled(strategy, base, models, params, context, out_dtype, threads=2):
    """(output, masks, factors) of the compiled path, called as merge_compiled calls it."""
    n = base.numel()
    full = strategy.with_defaults(params, len(models))
    rules = [strategy.keep(full, i, n, context) for i in range(len(models))]
    rescale = [full["rescale"] and r.mode != kernels.Keep.all().mode and full["density"][i] < 1
               for i, r in enumerate(rules)]
    out = torch.empty(n, dtype=out_dtype)
    masks = [torch.empty(n, dtype=torch.bool) for _ in models]
    bad, factors = kernels.sparsified_merge(
        out, base, models, full["weight"], rules, rescale=rescale, elect_signs=strategy.consensus,
        normalize=full["normalize"] and (strategy.consensus or abs(sum(full["weight"])) >= 1e-8),
        scale=full["lambda"], shape=context.shape, threads=threads, masks=masks)
    via_strategy = torch.empty(n, dtype=out_dtype)
    assert strategy.merge_compiled(via_strategy, base, models, params, context, threads=threads,
                                   release=False) == bad
    assert torch.equal(via_strategy.view(torch.uint8), out.view(torch.uint8))
    assert bad == int((~torch.isfinite(out)).sum())
    return out, masks, factors


def reference(strategy, base, models, params, context, out_dtype) -> torch.Tensor:
    shape = context.shape
    merged = strategy.merge(base.float().reshape(shape), [m.float().reshape(shape) for m in models], params,
                            context)
    return merged.reshape(-1).to(out_dtype)


@st.composite
def shaped(draw, n: int) -> tuple[int, ...]:
    """A shape of n elements: flat, rows, or three axes (DELLA ranks along axis 1)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0] or [1]
    a = draw(st.sampled_from(divisors))
    rest = n // a if a else 0
    kind = draw(st.sampled_from(["flat", "rows", "three"]))
    if kind == "flat" or n == 0:
        return (n,)
    if kind == "rows":
        return (a, rest)
    b = draw(st.sampled_from([d for d in range(1, rest + 1) if rest % d == 0]))
    return (a, b, rest // b)


@needs_c
@given(st.sampled_from(sorted(SPARSE)), inputs(), st.data())
def test_compiled_family_equals_reference(name, case, data):
    strategy = SPARSE[name]
    base, models, out_dtype = case
    shape = data.draw(shaped(base.numel()))
    context = fusion.TensorContext("t", shape=shape, seed=data.draw(st.integers(0, 2 ** 64 - 1)))
    params = data.draw(family_params(strategy, len(models)))
    out, masks, factors = compiled(strategy, base, models, params, context, out_dtype)
    for i, (mask, want) in enumerate(zip(masks, reference_masks(strategy, base, models, params, context))):
        assert torch.equal(mask, want), f"{name}: model {i}'s mask"
        delta = models[i].float() - base.float()
        expected = sp.rescale_factor(delta, want) if params["rescale"] and params["density"][i] < 1 else None
        assert factors[i] == expected, f"{name}: model {i}'s factor"
    d = ulps(out, reference(strategy, base, models, params, context, out_dtype))
    assert int(d.max() if d.numel() else 0) == 0, name


def _big(shape, seed: int):
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=gen) * 0.05).bfloat16()
    # bf16 deltas on a coarse grid: magnitudes tie thousands of times
    models = [(base.float() + torch.randint(-3, 4, shape, generator=gen) * 2.0 ** -9).bfloat16()
              for _ in range(3)]
    return base.reshape(-1), [m.reshape(-1) for m in models]


@needs_c
@pytest.mark.parametrize("shape", [(431, 467), (40, 9, 557)])
def test_threads_do_not_change_masks_or_results(shape):
    """Ties at the k-th magnitude, DELLA rows and bitmap bytes straddle the threads' ranges."""
    base, models = _big(shape, math.prod(shape) % 97)
    context = fusion.TensorContext("t", shape=shape, seed=77)
    for name, strategy in SPARSE.items():
        params = {"weight": [1.0, 0.5, -0.7], "density": [0.5, 0.3, 0.77], "gamma": [0.05, 0.3, 0.01],
                  "epsilon": [0.2, 0.1, 0.15], "lambda": 0.9, "rescale": True}
        runs = [compiled(strategy, base, models, params, context, torch.bfloat16, threads=t) for t in (1, 4)]
        assert torch.equal(runs[0][0].view(torch.int16), runs[1][0].view(torch.int16)), name
        assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1])), name
        assert runs[0][2] == runs[1][2], name
        expected = reference(strategy, base, models, params, context, torch.bfloat16)
        assert torch.equal(runs[0][0].view(torch.int16), expected.view(torch.int16)), name


@needs_c
def test_keep_rules_check_their_arguments():
    base, models, out = torch.zeros(8), [torch.ones(8)], torch.empty(8)
    with pytest.raises(ValueError, match="a rule for each"):
        kernels.sparsified_merge(out, base, models, [1.0], [])
    with pytest.raises(ValueError, match="does not have 8 elements"):
        kernels.sparsified_merge(out, base, models, [1.0], [kernels.Keep.all()], shape=(3, 3))
    assert kernels.Keep.random(1, 0.3).a == math.ceil(0.3 * 2 ** 24)
    assert kernels.Keep.ranked(1, 1.0, 0.5) == kernels.Keep.all()
    assert kernels.Keep.ranked(1, 0.0, 0.5) == kernels.Keep.top(0)
    assert kernels.Keep.band(3, 5) == kernels.Keep(kernels.Keep.band(3, 5).mode, 8, 3)


@needs_c
@pytest.mark.parametrize("threads", [1, 3])
def test_rescale_sums_are_exact_over_any_range_of_magnitudes(threads):
    """Entries 2⁻³¹ and further below a block's largest take the kernels' slow path; the sums stay
    exact (a float32 sum of these would overflow, or lose the small entries)."""
    gen = torch.Generator().manual_seed(4)
    n = 300_000
    magnitude = torch.pow(2.0, torch.randint(-140, 127, (n,), generator=gen).float())
    delta = (magnitude * torch.rand(n, generator=gen) * torch.where(torch.rand(n, generator=gen) < 0.5, -1, 1))
    delta[::7] = 1.5e-45  # subnormals
    delta[::1009] = 3e38
    base = torch.zeros(n)
    rules = [kernels.Keep.random(11, 0.4), kernels.Keep.top(12_345)]
    masks = [torch.empty(n, dtype=torch.bool) for _ in rules]
    _, factors = kernels.sparsified_merge(torch.empty(n), base, [delta, delta.flip(0)], [1.0, 1.0], rules,
                                          rescale=True, elect_signs=False, normalize=False, threads=threads,
                                          masks=masks)
    for factor, mask, d in zip(factors, masks, [delta, delta.flip(0)]):
        assert factor == sp.rescale_factor(d, mask)
    assert sp.abs_sum(delta) == math.fsum(abs(v) for v in delta.tolist())
