"""della and della_linear: DELLA's magnitude-ranked random drop (larger entries kept more often,
ranked within each row), the kept entries rescaled to the task vector's L1 norm, merged with TIES'
sign election or summed."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import fusion
from fusion.api.task_vectors import TaskVectorMerge, family_parameters

PAPER = "https://arxiv.org/abs/2406.11617"
DENSITY = "the mean probability that an entry is kept (seeded draws)"
EPSILON = fusion.Param("epsilon", float, 0.15, per_model=True, minimum=0.0,
                       help="εᵢ, keep probabilities run from dᵢ − εᵢ (smallest magnitude in a row) "
                            "to dᵢ + εᵢ (largest); both must lie inside (0, 1)")


class Della(TaskVectorMerge):
    name = "della"
    description = ("DELLA: keep each task-vector entry with a probability rising with its magnitude's "
                   "rank in its row (dᵢ ± εᵢ), rescale, elect signs as TIES does.")
    paper = PAPER
    sparsification = "ranked"
    consensus = True
    random = True
    parameters = family_parameters(normalize=True, rescale=True, consensus=True, density=DENSITY,
                                   extra=(EPSILON,))

    def check(self, params: Mapping[str, Any], context: fusion.TensorContext) -> list[str]:
        """dᵢ ± εᵢ must lie inside (0, 1) where 0 < dᵢ < 1 (mergekit's rule, checked at plan time
        instead of mid-merge): one sentence per model that breaks it."""
        problems = []
        for i, (d, e) in enumerate(zip(params["density"], params["epsilon"])):
            if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
                model = context.models[i] if i < len(context.models) else f"model {i + 1}"
                problems.append(f"{model}: density {d:g} with epsilon {e:g} gives keep probabilities from "
                                f"{d - e:g} to {d + e:g}, but both must lie inside (0, 1); use an epsilon "
                                f"below {min(d, 1 - d):g} or another density")
        return problems


class DellaLinear(Della):
    name = "della_linear"
    description = ("DELLA's magnitude-ranked random drop and rescale, then the weighted sum of the "
                   "task vectors (no sign election).")
    consensus = False
    parameters = family_parameters(normalize=False, rescale=True, consensus=False, density=DENSITY,
                                   extra=(EPSILON,))


@fusion.hookimpl
def register_strategies(register: Callable[[fusion.Strategy], None]) -> None:
    register(Della())
    register(DellaLinear())
