"""task_arithmetic: add the weighted task vectors δᵢ = θᵢ − θ₀ to the base."""

from __future__ import annotations

import fusion
from fusion.api.task_vectors import TaskVectorMerge, family_parameters


class TaskArithmetic(TaskVectorMerge):
    name = "task_arithmetic"
    description = "Base plus the weighted sum of task vectors: θ₀ + λ·Σ wᵢ(θᵢ − θ₀)."
    paper = "https://arxiv.org/abs/2212.04089"
    elementwise = True
    parameters = family_parameters(normalize=False, rescale=False, consensus=False, density=None)


@fusion.hookimpl
def register_strategies(register) -> None:
    register(TaskArithmetic())
