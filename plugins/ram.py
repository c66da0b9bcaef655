"""ram and ramplus_tl: Reinforced Agent Merging. Entries only one model changes are taken as they
are, entries several change are averaged over those models; RAM+ scales each model's unique
entries up by how much of it overlaps with the others."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import fusion
from fusion.api.strategy import float32_deviations

if TYPE_CHECKING:
    import torch

_CHANGED = "an entry of a task vector counts as changed where |δᵢ| > epsilon"


def _changes(base: "torch.Tensor", tensors: "Sequence[torch.Tensor]", epsilon: float):
    """The task vectors δᵢ (computed in place of the inputs), their masks νᵢ = |δᵢ| > ε, and
    c, the number of models that change each entry."""
    import torch

    deltas = [t.sub_(base) for t in tensors]
    changed = [d.abs() > epsilon for d in deltas]
    count = torch.zeros(base.shape, dtype=torch.int32)
    for c in changed:
        count += c
    return deltas, changed, count


def unique_scales(shared: Sequence[int], unique: Sequence[int], r: float, alpha: float,
                  epsilon: float) -> list[float]:
    """λᵢ = 1 + r·clamp(ρᵢ, 0, α), ρᵢ = sᵢ / max(uᵢ, ε), from each model's counts of shared and
    unique changes, in float32 arithmetic as written (the counts and constants rounded to float32)."""
    import numpy as np

    f = np.float32
    out = []
    for s, u in zip(shared, unique):
        rho = f(s) / max(f(u), f(epsilon))
        out.append(float(f(1) + f(r) * min(max(rho, f(0)), f(alpha))))
    return out


class Ram(fusion.Strategy):
    name = "ram"
    description = ("RAM: add each entry's task-vector change as it is where one model changes it, "
                   "averaged over the models that change it where several do.")
    paper = "https://arxiv.org/abs/2601.13572"
    base = "required"
    min_models = 1
    elementwise = True
    parameters = (fusion.Param("epsilon", float, 1e-5, minimum=0.0, help=_CHANGED),)
    deviations = float32_deviations

    def merge(self, base, tensors, params, context):
        deltas, changed, count = _changes(base, tensors, params["epsilon"])
        divisor = count.clamp_(min=1).float()
        total = None
        for d, c in zip(deltas, changed):
            term = d.mul_(c).div_(divisor)
            total = term if total is None else total.add_(term)
        return base.add_(total)

    def merge_compiled(self, out, base, tensors, params, context, *, threads, release):
        from fusion.api import kernels

        return kernels.changed_mean(out, base, tensors, params["epsilon"], threads=threads, release=release)


class RamPlusTL(fusion.Strategy):
    name = "ramplus_tl"
    description = ("RAM+ (tensor-local): RAM with each model's unique entries scaled by "
                   "λᵢ = 1 + r·clamp(shared/unique count of the model in this tensor, 0, α).")
    paper = "https://arxiv.org/abs/2601.13572"
    base = "required"
    min_models = 1
    parameters = (
        fusion.Param("r", float, 0.1, help="how strongly the unique entries are scaled up"),
        fusion.Param("alpha", float, 0.2, minimum=0.0, help="the bound on the shared/unique ratio"),
        # > 0: it also bounds the ratio's denominator (a model with no unique entry: 0/0 otherwise)
        fusion.Param("epsilon", float, 1e-5, minimum=0.0, exclusive_minimum=True, help=_CHANGED),
    )
    deviations = float32_deviations

    def merge(self, base, tensors, params, context):
        import torch

        epsilon = params["epsilon"]
        deltas, changed, count = _changes(base, tensors, epsilon)
        unique, shared = count == 1, count > 1
        lambdas = unique_scales([int((c & shared).sum()) for c in changed],
                                [int((c & unique).sum()) for c in changed],
                                params["r"], params["alpha"], epsilon)
        divisor = count.clamp_(min=1).float()
        total = None
        for d, c, lam in zip(deltas, changed, lambdas):
            d.mul_(c)
            term = torch.where(unique, d * lam, d / divisor)
            total = term if total is None else total.add_(term)
        return base.add_(total)

    def merge_compiled(self, out, base, tensors, params, context, *, threads, release):
        from fusion.api import kernels

        epsilon = params["epsilon"]
        shared, unique = kernels.change_counts(base, tensors, epsilon, threads=threads, release=release)
        lambdas = unique_scales(shared, unique, params["r"], params["alpha"], epsilon)
        return kernels.changed_mean(out, base, tensors, epsilon, scales=lambdas, threads=threads,
                                    release=release)


@fusion.hookimpl
def register_strategies(register: Callable[[fusion.Strategy], None]) -> None:
    register(Ram())
    register(RamPlusTL())
