"""ties: TIES-Merging (trim, elect sign, disjoint merge) of task vectors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import fusion
from fusion.api.selection import topk_count, topk_mask

if TYPE_CHECKING:  # torch is imported in merge(), so that listing plugins stays fast
    import torch


class Ties(fusion.Strategy):
    name = "ties"
    description = (
        "TIES-Merging: keep each task vector's largest entries, elect a sign per entry, "
        "average the entries that agree with it."
    )
    paper = "https://arxiv.org/abs/2306.01708"
    base = "required"
    parameters = (
        fusion.Param("weight", float, 1.0, per_model=True, help="wᵢ, the task vector's weight"),
        fusion.Param("density", float, 1.0, per_model=True, minimum=0.0, maximum=1.0,
                     exclusive_minimum=True,
                     help="dᵢ, the fraction of entries kept, by magnitude: floor(dᵢ·n)"),
        fusion.Param("lambda", float, 1.0, help="λ, scales the merged task vector"),
        fusion.Param("normalize", bool, True,
                     help="divide by the summed weights of the models that agree with the sign"),
    )

    def merge(
        self,
        base: "torch.Tensor | None",
        tensors: "Sequence[torch.Tensor]",
        params: Mapping[str, Any],
        context: fusion.TensorContext,
    ) -> "torch.Tensor":
        import torch

        weights, densities = params["weight"], params["density"]
        deltas = [t - base for t in tensors]

        # (1) trim: δ̂ᵢ keeps δᵢ on its top-kᵢ positions by |δᵢ|, kᵢ = floor(dᵢ·n).
        trimmed = [
            torch.where(topk_mask(d.abs(), topk_count(density, d.numel())), d, 0.0)
            for d, density in zip(deltas, densities)
        ]
        weighted = [w * t for w, t in zip(weights, trimmed)]

        # (2) elect: s = +1 where Σ wᵢδ̂ᵢ ≥ 0, else −1.
        elected = torch.where(sum(weighted) >= 0, 1.0, -1.0)

        # (3) disjoint merge over mᵢ = [sign(wᵢδ̂ᵢ) = s]; sign(0) = 0 never agrees.
        agrees = [torch.sign(x) == elected for x in weighted]
        total = sum(torch.where(m, x, 0.0) for m, x in zip(agrees, weighted))
        if params["normalize"]:
            divisor = sum(torch.where(m, w, 0.0) for m, w in zip(agrees, weights))
            # Where no model agrees the sum is already 0; 1 keeps it 0 instead of 0/0.
            total = total / torch.where(divisor == 0, 1.0, divisor)
        return base + params["lambda"] * total

    def merge_compiled(self, out, base, tensors, params, context, *, threads, release):
        from fusion.api import kernels

        n = kernels.buffer(out).numel
        return kernels.ties(
            out, base, tensors, params["weight"], [topk_count(d, n) for d in params["density"]],
            lam=params["lambda"], normalize=params["normalize"], threads=threads, release=release)


    def deviations(self, params, compute_dtype):
        from fusion.api.strategy import float32_note, tie_break_note

        notes = [float32_note(self.name, compute_dtype)]
        if any(d < 1 for p in params for d in p["density"]):
            notes.append(tie_break_note())
        return [n for n in notes if n]

@fusion.hookimpl
def register_strategies(register: Callable[[fusion.Strategy], None]) -> None:
    register(Ties())
