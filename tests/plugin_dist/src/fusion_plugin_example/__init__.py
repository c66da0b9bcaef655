"""fusion-plugin-example: a `scaled_average` merge strategy, written only against fusion's
public plugin API (``fusion.hookimpl``, ``fusion.Strategy``, ``fusion.Param``).

    θ = scale · Σ wᵢθᵢ / Σ wᵢ
"""

from __future__ import annotations

import fusion


class ScaledAverage(fusion.Strategy):
    name = "scaled_average"
    description = "The weighted average of the models, scaled: scale · Σ wᵢθᵢ / Σ wᵢ."
    paper = "https://example.org/scaled-average"
    base = "unused"
    parameters = (
        fusion.Param("weight", float, 1.0, per_model=True, minimum=0, maximum=10,
                     exclusive_minimum=True, help="wᵢ, the model's weight"),
        fusion.Param("scale", float, 1.0, minimum=-2, maximum=2, help="multiplies the average"),
    )

    def merge(self, base, tensors, params, context):
        weights = params["weight"]
        total = sum(w * t for w, t in zip(weights, tensors))
        return params["scale"] * (total / sum(weights))


@fusion.hookimpl
def register_strategies(register):
    register(ScaledAverage())
