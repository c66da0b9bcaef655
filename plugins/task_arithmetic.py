"""task_arithmetic: add the weighted task vectors δᵢ = θᵢ − θ₀ to the base."""

from __future__ import annotations

import fusion


class TaskArithmetic(fusion.Strategy):
    name = "task_arithmetic"
    description = "Base plus the weighted sum of task vectors: θ₀ + λ·Σ wᵢ(θᵢ − θ₀)."
    paper = "https://arxiv.org/abs/2212.04089"
    base = "required"
    elementwise = True
    parameters = (
        fusion.Param("weight", float, 1.0, per_model=True, help="wᵢ, the task vector's weight"),
        fusion.Param("lambda", float, 1.0, help="λ, scales the summed task vectors"),
        fusion.Param("normalize", bool, False, help="divide by Σ wᵢ (left out when |Σ wᵢ| < 1e-8)"),
    )

    def merge(self, base, tensors, params, context):
        weights = params["weight"]
        delta = tensors[0].sub_(base).mul_(weights[0])  # the inputs are the host's copies
        for w, t in zip(weights[1:], tensors[1:]):
            delta.add_(t.sub_(base), alpha=w)
        if params["normalize"] and abs(sum(weights)) >= 1e-8:
            delta.div_(sum(weights))
        return base.add_(delta, alpha=params["lambda"])

    def merge_compiled(self, out, base, tensors, params, context, *, threads, release):
        from fusion.api import kernels

        weights = params["weight"]
        return kernels.task_arithmetic(
            out, base, tensors, weights, lam=params["lambda"],
            normalize=params["normalize"] and abs(sum(weights)) >= 1e-8,
            threads=threads, release=release)


    def deviations(self, params, compute_dtype):
        from fusion.api.strategy import float32_note

        return [n for n in (float32_note(self.name, compute_dtype),) if n]

@fusion.hookimpl
def register_strategies(register) -> None:
    register(TaskArithmetic())
