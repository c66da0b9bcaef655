"""linear: the weighted average of the models (Model Soups)."""

from __future__ import annotations

import fusion


def _denominator(weights: list[float]) -> float:
    denominator = sum(weights)
    if abs(denominator) < 1e-8:
        raise fusion.MergeError(
            f"the linear weights {weights} sum to 0, so their average is undefined; "
            f"change the weights or set normalize: false"
        )
    return denominator


class Linear(fusion.Strategy):
    name = "linear"
    description = "Weighted average of the models' parameters: Σ wᵢθᵢ / Σ wᵢ."
    paper = "https://arxiv.org/abs/2203.05482"
    base = "unused"
    elementwise = True
    parameters = (
        fusion.Param("weight", float, 1.0, per_model=True, help="wᵢ, the model's weight"),
        fusion.Param("normalize", bool, True, help="divide by Σ wᵢ"),
    )

    def merge(self, base, tensors, params, context):
        weights = params["weight"]
        total = tensors[0].mul_(weights[0])  # the inputs are the host's copies: work in place
        for w, t in zip(weights[1:], tensors[1:]):
            total.add_(t, alpha=w)
        if not params["normalize"]:
            return total
        return total.div_(_denominator(weights))

    def merge_compiled(self, out, base, tensors, params, context, *, threads, release):
        from fusion.api import kernels

        if params["normalize"]:
            _denominator(params["weight"])
        return kernels.weighted_sum(out, tensors, params["weight"], normalize=params["normalize"],
                                    threads=threads, release=release)


@fusion.hookimpl
def register_strategies(register) -> None:
    register(Linear())
