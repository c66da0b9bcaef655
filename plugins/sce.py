"""sce: Select, Calculate, Erase (FuseChat-2.0's merge of task vectors)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import fusion
from fusion.api.selection import topk_count, topk_mask
from fusion.api.strategy import float32_note, tie_break_note
from fusion.api.task_vectors import INT8_HELP

if TYPE_CHECKING:  # torch is imported in merge(), so that listing plugins stays fast
    import torch

_CHUNK = 1 << 20


def _sum_of_squares(x: "torch.Tensor") -> float:
    """Σ x², accumulated in float64 so that it is exactly 0 only when x is all zeros (float32
    squares of deltas below ~1e-19 underflow), in chunks so as not to double the memory."""
    return sum(float(c.double().square().sum()) for c in x.reshape(-1).split(_CHUNK))


def _population_variance(deltas: "Sequence[torch.Tensor]") -> "torch.Tensor":
    """v = (1/N)·Σᵢ (δᵢ − μ)², μ = (1/N)·Σᵢ δᵢ, at each position, rounded to float32.

    Two passes in float64, models summed in order: a kernel can reproduce the key bit for bit,
    and models whose deltas agree at a position give exactly v = 0 there (so the position is
    never selected), which a float32 mean does not guarantee.
    """
    n_models = len(deltas)
    mean = sum(d.double() for d in deltas) / n_models
    return (sum((d.double() - mean).square() for d in deltas) / n_models).float()


class Sce(fusion.Strategy):
    name = "sce"
    description = (
        "SCE: keep the entries whose task vectors vary most across models, weight each model by "
        "its share of the squared deltas, drop entries whose sign disagrees with the summed deltas."
    )
    paper = "https://arxiv.org/abs/2408.07990"
    base = "required"
    parameters = (
        fusion.Param("select_topk", float, 1.0, minimum=0.0, maximum=1.0, exclusive_minimum=True,
                     help="τ, the fraction of the positions with non-zero variance that are kept"),
        fusion.Param("select_scope", str, "all", choices=("all", "weights"),
                     help="all: the selection masks the merge too; weights: it only sets the "
                          "model weights (the FuseChat-2.0 code's variant)"),
        fusion.Param("lambda", float, 1.0, help="λ, scales the merged task vector"),
        fusion.Param("weight", float, 1.0, per_model=True,
                     help="accepted for mergekit compatibility; no effect (SCE weighs each model by "
                          "its share of the squared deltas, and mergekit ignores it too)"),
        fusion.Param("int8_mask", bool, False, help=INT8_HELP),
    )

    def deviations(self, params, compute_dtype):
        notes = [float32_note(self.name, compute_dtype),
                 tie_break_note() if any(p["select_topk"] < 1 for p in params) else None,
                 "SCE weights: fusion weights each model by its squared deltas however small they are; mergekit "
                 "uses uniform weights for a tensor whose mean squared deltas sum to less than 1e-6"]
        lambdas = sorted({p["lambda"] for p in params} - {1.0})
        if lambdas:
            notes.append(f"lambda = {', '.join(f'{x:g}' for x in lambdas)} scales SCE's merged task vector; "
                         f"mergekit's sce has no lambda (it ignores one)")
        return [n for n in notes if n]

    def merge(
        self,
        base: "torch.Tensor | None",
        tensors: "Sequence[torch.Tensor]",
        params: Mapping[str, Any],
        context: fusion.TensorContext,
    ) -> "torch.Tensor":
        import torch

        tau = params["select_topk"]
        deltas = [t - base for t in tensors]

        # (1) select S, the top floor(τ·count_nonzero(v)) positions by variance; τ = 1 keeps all.
        if tau < 1:
            variance = _population_variance(deltas)
            selected = topk_mask(variance, topk_count(tau, int(torch.count_nonzero(variance))))
            in_selection = [torch.where(selected, d, 0.0) for d in deltas]
            if params["select_scope"] == "all":
                deltas = in_selection
        else:
            in_selection = deltas

        # (2) calculate ηᵢ = Σ(δᵢ⊙S)² / Σⱼ Σ(δⱼ⊙S)²; uniform only for an exact 0 (no threshold:
        # fine-tunes' deltas are small, and a threshold would throw their weights away).
        energies = [_sum_of_squares(d) for d in in_selection]
        total_energy = sum(energies)
        if total_energy == 0:
            etas = [1.0 / len(deltas)] * len(deltas)
        else:
            etas = [e / total_energy for e in energies]

        # (3) erase: s = +1 where Σ δᵢ ≥ 0, else −1; mᵢ = [sign(δᵢ) = s], sign(0) = 0.
        elected = torch.where(sum(deltas) >= 0, 1.0, -1.0)
        agrees = [torch.sign(d) == elected for d in deltas]

        # (4) Δ = λ · Σ ηᵢmᵢδᵢ / D, D = Σ ηᵢmᵢ, 0 replaced by 1 (no model agrees: Δ = 0).
        total = sum(torch.where(m, eta * d, 0.0) for m, eta, d in zip(agrees, etas, deltas))
        divisor = sum(torch.where(m, eta, 0.0) for m, eta in zip(agrees, etas))
        return base + params["lambda"] * (total / torch.where(divisor == 0, 1.0, divisor))

    def merge_compiled(self, out, base, tensors, params, context, *, threads, release):
        from fusion.api import kernels

        bad, _ = kernels.variance_selected_merge(
            out, base, tensors, fraction=params["select_topk"],
            mask_deltas=params["select_scope"] == "all", scale=params["lambda"],
            threads=threads, release=release)
        return bad


@fusion.hookimpl
def register_strategies(register: Callable[[fusion.Strategy], None]) -> None:
    register(Sce())
