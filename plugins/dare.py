"""dare_linear and dare_ties: DARE's random drop of task-vector entries, with the kept ones
rescaled to the task vector's L1 norm, summed or merged with TIES' sign election."""

from __future__ import annotations

from typing import Callable

import fusion
from fusion.api.task_vectors import TaskVectorMerge, family_parameters

PAPER = "https://arxiv.org/abs/2311.03099"
DENSITY = "the probability that each entry is kept (seeded draws)"


class DareLinear(TaskVectorMerge):
    name = "dare_linear"
    description = ("DARE: keep each task-vector entry with probability dᵢ, rescale the kept ones to "
                   "the task vector's L1 norm, add the weighted sum to the base.")
    paper = PAPER
    sparsification = "random"
    random = True
    parameters = family_parameters(normalize=False, rescale=True, consensus=False, density=DENSITY)


class DareTies(TaskVectorMerge):
    name = "dare_ties"
    description = ("DARE-TIES: DARE's random drop and rescale, then TIES' sign election over the "
                   "weighted task vectors.")
    paper = PAPER
    sparsification = "random"
    consensus = True
    random = True
    parameters = family_parameters(normalize=False, rescale=True, consensus=True, density=DENSITY)


@fusion.hookimpl
def register_strategies(register: Callable[[fusion.Strategy], None]) -> None:
    register(DareLinear())
    register(DareTies())
