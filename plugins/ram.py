"""ram and ramplus_tl: Reinforced Agent Merging. Entries only one model changes are taken as they
are, entries several change are averaged over those models; RAM+ scales each model's unique
entries up by how much of it overlaps with the others."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import fusion

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


class Ram(fusion.Strategy):
    name = "ram"
    description = ("RAM: add each entry's task-vector change as it is where one model changes it, "
                   "averaged over the models that change it where several do.")
    paper = "https://arxiv.org/abs/2601.13572"
    base = "required"
    min_models = 1
    elementwise = True
    parameters = (fusion.Param("epsilon", float, 1e-5, minimum=0.0, help=_CHANGED),)

    def merge(self, base, tensors, params, context):
        deltas, changed, count = _changes(base, tensors, params["epsilon"])
        divisor = count.clamp_(min=1).float()
        total = None
        for d, c in zip(deltas, changed):
            term = d.mul_(c).div_(divisor)
            total = term if total is None else total.add_(term)
        return base.add_(total)


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

    def merge(self, base, tensors, params, context):
        import torch

        epsilon = params["epsilon"]
        deltas, changed, count = _changes(base, tensors, epsilon)
        unique, shared = count == 1, count > 1
        # λᵢ as float32 tensor arithmetic on the integer counts, exactly as written
        shared_counts = torch.stack([(c & shared).sum() for c in changed])
        unique_counts = torch.stack([(c & unique).sum() for c in changed])
        rho = shared_counts / unique_counts.clamp(min=epsilon)
        lambdas = 1 + params["r"] * rho.clamp(min=0, max=params["alpha"])
        divisor = count.clamp_(min=1).float()
        total = None
        for d, c, lam in zip(deltas, changed, lambdas):
            d.mul_(c)
            term = torch.where(unique, d * lam, d / divisor)
            total = term if total is None else total.add_(term)
        return base.add_(total)


@fusion.hookimpl
def register_strategies(register: Callable[[fusion.Strategy], None]) -> None:
    register(Ram())
    register(RamPlusTL())
