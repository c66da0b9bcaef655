"""passthrough: one model's tensors as they are, or scaled."""

from __future__ import annotations

from typing import Callable

import fusion


class Passthrough(fusion.Strategy):
    name = "passthrough"
    description = "One model's tensors unchanged, or multiplied by scale (a per-tensor factor, e.g. by filter)."
    base = "unused"
    min_models = max_models = 1
    elementwise = True
    parameters = (
        fusion.Param("scale", float, None, per_model=True,
                     help="multiply the tensor by this (unset: copy it exactly)"),
    )

    def merge(self, base, tensors, params, context):
        (scale,) = params["scale"]
        return tensors[0] if scale is None else tensors[0].mul_(scale)

    def merge_compiled(self, out, base, tensors, params, context, *, threads, release):
        from fusion.api import kernels

        (scale,) = params["scale"]
        # 1·x is x exactly: a copy into the output dtype
        return kernels.combination(out, tensors, [[1.0 if scale is None else scale]], threads=threads,
                                   release=release)


@fusion.hookimpl
def register_strategies(register: Callable[[fusion.Strategy], None]) -> None:
    register(Passthrough())
