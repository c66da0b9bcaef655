"""nearswap: take the other model's value where it is close to the base's, move toward it by t
elsewhere."""

from __future__ import annotations

from typing import Callable

import fusion
from fusion.api.strategy import float32_deviations


class Nearswap(fusion.Strategy):
    name = "nearswap"
    description = ("Per element, the other model's value where it is within t of the base's; elsewhere "
                   "a step of t from the base toward it.")
    paper = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    base = "required"
    min_models = max_models = 1
    elementwise = True
    parameters = (
        fusion.Param("t", float, None, required=True,
                     help="the distance within which the other model's value is taken (≤ 0: the base)"),
    )
    deviations = float32_deviations

    def merge(self, base, tensors, params, context):
        other = tensors[0]
        # w = clamp(t / max(|θ₀ − θ₁|, 1e-6), 0, 1), the quotient as t times the float32
        # reciprocal (how torch evaluates a number divided by a tensor)
        weight = (base - other).abs_().clamp_(min=1e-6).reciprocal_().mul_(params["t"]).clamp_(0.0, 1.0)
        return weight * other + (1 - weight) * base

    def merge_compiled(self, out, base, tensors, params, context, *, threads, release):
        from fusion.api import kernels

        return kernels.distance_blend(out, base, tensors[0], params["t"], threads=threads, release=release)


@fusion.hookimpl
def register_strategies(register: Callable[[fusion.Strategy], None]) -> None:
    register(Nearswap())
