"""Built-in fusion functions of pairwise fusion: min_ce (FuseChat) and avg_ce (FuseLLM)."""

from __future__ import annotations

import math

import fusion


class MinCE(fusion.FusionFunction):
    name = "min_ce"
    description = "The candidate with the lowest sequence cross-entropy (the pivot's own on ties)."

    def weights(self, ce):
        best = min(range(len(ce)), key=lambda i: (ce[i], i))
        return [1.0 if i == best else 0.0 for i in range(len(ce))]


class AvgCE(fusion.FusionFunction):
    name = "avg_ce"
    description = "Mix the candidates with weights softmax(exp(−CE)) (FuseLLM's; FuseChat uses min_ce)."

    def weights(self, ce):
        scores = [math.exp(-c) for c in ce]
        top = max(scores)
        e = [math.exp(s - top) for s in scores]
        return [x / sum(e) for x in e]


@fusion.hookimpl
def register_fusion_functions(register):
    register(MinCE())
    register(AvgCE())
