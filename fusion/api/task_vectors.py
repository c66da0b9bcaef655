"""The generalized task arithmetic: one merge of task vectors δᵢ = θᵢ − θ₀, of which
task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della and
della_linear are settings (a sparsification and whether signs are elected), as in mergekit.
A plugin makes another setting by subclassing :class:`TaskVectorMerge`, as the built-ins do.

Per tensor:
1. sparsify: δ̂ᵢ keeps the entries of δᵢ that the strategy's rule keeps (fusion.api.sparsify:
   none, magnitude top-k, random, a magnitude band, rank-based random), times Σ|δᵢ| / Σ|δ̂ᵢ| when
   ``rescale``;
2. without sign consensus: Δ = Σ wᵢδ̂ᵢ, divided by Σ wᵢ when ``normalize`` (not when |Σ wᵢ| < 1e-8);
   with it (the TIES election): xᵢ = wᵢδ̂ᵢ, s = +1 where Σ xᵢ ≥ 0 else −1, Δ = Σ of the xᵢ whose sign
   is s, divided by the sum of their wᵢ when ``normalize`` (0 → 1);
3. θ₀ + λ·Δ. A non-finite δᵢ entry makes that output entry NaN, whatever the rule keeps, so it is
   reported, never silently replaced by the base.

The two sums keep the arithmetic order each name had before the family was generalized:
task_arithmetic's fused multiply-adds (Tensor.add_ with alpha) and TIES' products then sums; the
compiled path follows the same order.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .params import Param
from .random import stream_seed
from .sparsify import band_bounds, magnitude_count, sparsify
from .strategy import Strategy, TensorContext, float32_note, seeded_note, tie_break_note

if TYPE_CHECKING:  # torch is imported in merge(), so that listing plugins stays fast
    import torch

    from . import kernels

INT8_HELP = "accepted for mergekit compatibility; no effect (the sign masks are exact either way)"


def family_parameters(*, normalize: bool, rescale: bool, consensus: bool, density: str | None,
                      extra: tuple[Param, ...] = ()) -> tuple[Param, ...]:
    """mergekit's parameter set of every task-arithmetic method, with one method's defaults;
    ``density`` says what the density means for it (None: the method keeps every entry)."""
    unused = "accepted for mergekit compatibility; no effect here (every entry is kept)"
    return (
        Param("weight", float, 1.0, per_model=True, help="wᵢ, the task vector's weight"),
        Param("density", float, 1.0, per_model=True, minimum=0.0, maximum=1.0,
                     help=f"dᵢ, {density}; 1 keeps the task vector whole" if density else unused),
        *extra,
        Param("lambda", float, 1.0, help="λ, scales the merged task vector"),
        Param("normalize", bool, normalize,
                     help="divide by the summed weights of the models whose sign agrees with the "
                          "elected one, per entry" if consensus else
                          "divide by Σ wᵢ (left out when |Σ wᵢ| < 1e-8)"),
        Param("rescale", bool, rescale,
                     help="scale each sparsified task vector back to its L1 norm: times Σ|δᵢ| / Σ|δ̂ᵢ|"
                     if density else unused),
        Param("int8_mask", bool, False, help=INT8_HELP),
    )


def divides_by_the_weights(params: Mapping[str, Any]) -> bool:
    """Whether normalize, without sign election, divides by Σ wᵢ: not where |Σ wᵢ| < 1e-8."""
    return params["normalize"] and abs(sum(params["weight"])) >= 1e-8


class TaskVectorMerge(Strategy):
    """A setting of the generalized task arithmetic: ``sparsification`` (a mode of
    fusion.api.sparsify) and ``consensus`` (elect signs). Subclasses also set name, description,
    paper and parameters (:func:`family_parameters`)."""

    base = "required"
    sparsification = "none"
    consensus = False

    def deviations(self, params, compute_dtype):
        sparse = self.sparsification != "none" and any(d < 1 for p in params for d in p["density"])
        notes = [float32_note(self.name, compute_dtype),
                 tie_break_note() if sparse and self.sparsification in ("magnitude", "band") else None,
                 seeded_note() if sparse and self.random else None]
        return [n for n in notes if n]

    def merge(
        self,
        base: "torch.Tensor",
        tensors: "Sequence[torch.Tensor]",
        params: Mapping[str, Any],
        context: TensorContext,
    ) -> "torch.Tensor":
        import torch

        params = self.with_defaults(params, len(tensors))
        weights = params["weight"]
        deltas = [t.sub_(base) for t in tensors]  # the inputs are the host's copies
        plain = self.sparsification == "none" and not self.consensus
        poison = None  # task arithmetic's sums turn every non-finite δ into a non-finite result
        if not plain:
            poison = ~deltas[0].isfinite()
            for d in deltas[1:]:
                poison |= ~d.isfinite()
        kept = [self.sparsify(d, params, i, context) for i, d in enumerate(deltas)]
        del deltas
        if self.consensus:
            weighted = [w * k for w, k in zip(weights, kept)]
            elected = torch.where(sum(weighted) >= 0, 1.0, -1.0)
            # mᵢ = [sign(wᵢδ̂ᵢ) = s]: a zero entry never agrees, a negative weight flips the vote
            agrees = [torch.sign(x) == elected for x in weighted]
            total = sum(torch.where(m, x, 0.0) for m, x in zip(agrees, weighted))
            if params["normalize"]:
                divisor = sum(torch.where(m, w, 0.0) for m, w in zip(agrees, weights))
                # where no model agrees the sum is already 0; 1 keeps it 0 instead of 0/0
                total = total / torch.where(divisor == 0, 1.0, divisor)
            result = base + params["lambda"] * total
        else:
            total = kept[0].mul(weights[0])
            for w, k in zip(weights[1:], kept[1:]):
                total.add_(k, alpha=w)
            if divides_by_the_weights(params):
                total.div_(sum(weights))
            result = base.add_(total, alpha=params["lambda"])
        if poison is not None and bool(poison.any()):
            result = torch.where(poison, float("nan"), result)
        return result

    def merge_compiled(self, out, base, tensors, params, context, *, threads, release):
        from . import kernels

        params = self.with_defaults(params, len(tensors))
        weights = params["weight"]
        if self.sparsification == "none" and not self.consensus:
            return kernels.weighted_sum(out, tensors, weights, base=base, scale=params["lambda"],
                                        normalize=divides_by_the_weights(params), threads=threads,
                                        release=release)
        n = kernels.buffer(out).numel
        rules = [self.keep(params, i, n, context) for i in range(len(tensors))]
        # the reference rescales every task vector it sparsifies (d < 1), and no other
        rescale = [params["rescale"] and rule != kernels.Keep.all() for rule in rules]
        bad, _ = kernels.sparsified_merge(
            out, base, tensors, weights, rules, rescale=rescale, elect_signs=self.consensus,
            normalize=params["normalize"] if self.consensus else divides_by_the_weights(params),
            scale=params["lambda"], shape=context.shape if math.prod(context.shape) == n else (n,),
            first=context.start, threads=threads, release=release)
        return bad

    def keep(self, params: Mapping[str, Any], i: int, n: int, context: TensorContext) -> "kernels.Keep":
        """Model i's rule as a :class:`fusion.api.kernels.Keep`: the masks of fusion.api.sparsify."""
        from .kernels import Keep

        density = params["density"][i]
        if self.sparsification == "none" or density >= 1:
            return Keep.all()
        seed = stream_seed(context.seed, i)
        if self.sparsification == "magnitude":
            return Keep.top(magnitude_count(density, n))
        if self.sparsification == "band":
            return Keep.band(*band_bounds(density, params["gamma"][i], n))
        if self.sparsification == "random":
            return Keep.random(seed, density)
        return Keep.ranked(seed, density, params["epsilon"][i])

    def with_defaults(self, params: Mapping[str, Any], n_models: int) -> dict[str, Any]:
        """``params`` with every declared parameter it lacks at its default (the host passes them
        all; a direct caller may pass only those it sets)."""
        full = dict(params)
        for p in self.parameters:
            full.setdefault(p.name, [p.default] * n_models if p.per_model else p.default)
        return full

    def sparsify(self, delta: "torch.Tensor", params: Mapping[str, Any], i: int,
                 context: TensorContext) -> "torch.Tensor":
        """δ̂ᵢ of model i; model i draws from its own stream of the tensor's seed."""
        return sparsify(delta, self.sparsification, params["density"][i],
                        gamma=params["gamma"][i] if "gamma" in params else 0.0,
                        epsilon=params["epsilon"][i] if "epsilon" in params else 0.0,
                        seed=stream_seed(context.seed, i), start=context.start,
                        rescale=params["rescale"])
