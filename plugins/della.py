"""della and della_linear: DELLA's magnitude-ranked random drop (larger entries kept more often,
ranked within each row), the kept entries rescaled to the task vector's L1 norm, merged with TIES'
sign election or summed."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import fusion
from fusion.plugins.task_vectors import EPSILON, TaskVectorMerge, della_problem, family_parameters

PAPER = "https://arxiv.org/abs/2406.11617"
DENSITY = "the mean probability that an entry is kept (seeded draws)"


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
        return della_problem(params, context)


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
