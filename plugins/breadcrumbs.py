"""breadcrumbs and breadcrumbs_ties: Model Breadcrumbs' magnitude band (drop the largest outliers
and the smallest entries of each task vector), summed or merged with TIES' sign election."""

from __future__ import annotations

from typing import Callable

import fusion
from fusion.api.task_vectors import TaskVectorMerge, family_parameters

PAPER = "https://arxiv.org/abs/2312.06795"
DENSITY = "the fraction of entries kept: floor(dᵢ·n) of them, below the γᵢ outliers by |δᵢ|"
GAMMA = fusion.Param("gamma", float, 0.01, per_model=True, minimum=0.0, maximum=1.0,
                     help="γᵢ, the fraction of the largest-magnitude entries dropped as outliers "
                          "(fewer where dᵢ + γᵢ > 1)")


class Breadcrumbs(TaskVectorMerge):
    name = "breadcrumbs"
    description = ("Model Breadcrumbs: drop each task vector's γᵢ largest-magnitude entries and its "
                   "smallest, keeping a fraction dᵢ; add the weighted sum to the base.")
    paper = PAPER
    sparsification = "band"
    parameters = family_parameters(normalize=False, rescale=False, consensus=False, density=DENSITY,
                                   extra=(GAMMA,))


class BreadcrumbsTies(TaskVectorMerge):
    name = "breadcrumbs_ties"
    description = ("Model Breadcrumbs' magnitude band, then TIES' sign election over the weighted "
                   "task vectors.")
    paper = PAPER
    sparsification = "band"
    consensus = True
    parameters = family_parameters(normalize=False, rescale=False, consensus=True, density=DENSITY,
                                   extra=(GAMMA,))


@fusion.hookimpl
def register_strategies(register: Callable[[fusion.Strategy], None]) -> None:
    register(Breadcrumbs())
    register(BreadcrumbsTies())
