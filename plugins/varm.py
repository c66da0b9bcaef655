"""varm: variation-ratio merge (FuseChat-1.0's merge of task vectors)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import fusion

if TYPE_CHECKING:  # torch is not needed to list plugins
    import torch

_CHUNK = 1 << 20


def _mean_square(x: "torch.Tensor") -> float:
    """mean(x²), accumulated in float64 so that it is exactly 0 only when x is all zeros, in
    chunks so as not to double the memory. An empty tensor has nothing to weigh: 0."""
    total = sum(float(c.double().square().sum()) for c in x.reshape(-1).split(_CHUNK))
    return total / max(x.numel(), 1)


class Varm(fusion.Strategy):
    name = "varm"
    description = (
        "VaRM: add the task vectors, each weighted by its share of the mean squared delta: "
        "Wᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²)."
    )
    paper = "https://arxiv.org/abs/2402.16107"
    base = "required"
    # The method has no parameters: the weights come from the deltas themselves.
    parameters = ()

    def merge(
        self,
        base: "torch.Tensor | None",
        tensors: "Sequence[torch.Tensor]",
        params: Mapping[str, Any],
        context: fusion.TensorContext,
    ) -> "torch.Tensor":
        deltas = [t - base for t in tensors]
        variations = [_mean_square(d) for d in deltas]
        total = sum(variations)
        if total == 0:  # every δᵢ is 0, so any weights give Δ = 0; uniform, as docs/strategies.md says
            weights = [1.0 / len(deltas)] * len(deltas)
        else:
            weights = [v / total for v in variations]
        return base + sum(w * d for w, d in zip(weights, deltas))


@fusion.hookimpl
def register_strategies(register: Callable[[fusion.Strategy], None]) -> None:
    register(Varm())
