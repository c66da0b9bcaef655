"""ties: TIES-Merging (trim, elect sign, disjoint merge) of task vectors."""

from __future__ import annotations

from typing import Callable

import fusion
from fusion.api.task_vectors import TaskVectorMerge, family_parameters


class Ties(TaskVectorMerge):
    name = "ties"
    description = (
        "TIES-Merging: keep each task vector's largest entries, elect a sign per entry, "
        "average the entries that agree with it."
    )
    paper = "https://arxiv.org/abs/2306.01708"
    sparsification = "magnitude"
    consensus = True
    parameters = family_parameters(
        normalize=True, rescale=False, consensus=True,
        density="the fraction of entries kept, those of largest |δᵢ|: max(1, floor(dᵢ·n))")


@fusion.hookimpl
def register_strategies(register: Callable[[fusion.Strategy], None]) -> None:
    register(Ties())
