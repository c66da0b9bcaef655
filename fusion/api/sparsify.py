"""Which entries of a task vector δ = θ − θ₀ a merge keeps: the sparsifiers of the task-arithmetic
family (TIES, DARE, breadcrumbs, DELLA) and the rescale that restores the L1 norm of what they
drop. These are the reference masks: the compiled kernels reproduce them bit for bit, so each rule
lives here once.

Every magnitude rule ranks the entries of δ in one total order: larger |δ| first, equal |δ| by the
lower flat index (NaN above every number), the order of :func:`fusion.api.selection.topk_mask`.
Random rules draw u from :func:`fusion.api.random.uniform` at each element's flat index and keep
the element iff u < p (its keep probability), so the masks depend on the seed alone.

A density d ≥ 1 keeps δ unchanged (no rescale, γ and ε ignored); see docs/strategies.md for each
rule's edge cases.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .random import uniform
from .selection import topk_count, topk_mask

if TYPE_CHECKING:  # importing a plugin must not import torch
    import torch

__all__ = ["MODES", "abs_sum", "band_bounds", "band_mask", "keep_probabilities", "magnitude_count",
           "magnitude_mask", "random_mask", "ranked_mask", "rescale_factor", "row_layout", "sparsify"]

#: none (keep all), magnitude (TIES' top-k), random (DARE), band (breadcrumbs), ranked (DELLA)
MODES = ("none", "magnitude", "random", "band", "ranked")
#: below this L1 norm (before or after the mask) the kept entries are not rescaled
RESCALE_EPS = 1e-7
_CHUNK = 1 << 22


def magnitude_count(density: float, n: int) -> int:
    """How many entries TIES keeps: max(1, floor(d·n)) for 0 < d < 1 (at least one), 0 for d ≤ 0
    or n = 0, all for d ≥ 1."""
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, topk_count(density, n))


def band_bounds(density: float, gamma: float, n: int) -> tuple[int, int]:
    """(skip, keep) of breadcrumbs: drop the ``skip`` largest |δ|, keep the next ``keep``, drop the
    rest. keep = floor(d·n); the smallest max(0, n − keep − floor(γ·n)) are dropped, so skip is
    floor(γ·n) unless d + γ > 1, where fewer outliers are dropped to keep floor(d·n)."""
    keep = topk_count(density, n)
    bottom = max(0, n - keep - topk_count(gamma, n))
    return n - bottom - keep, keep


def row_layout(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(outer, length, inner): DELLA ranks along axis 1, so a tensor of shape (a, b, c, …) is a·c·…
    rows of b entries, entry (i, j, r) at flat index (i·b + j)·inner + r. A 2-D [out, in] weight
    is ranked within each row; a 1-D tensor (or a scalar) is one row."""
    if len(shape) < 2:
        return 1, math.prod(shape), 1
    return shape[0], shape[1], math.prod(shape[2:])


def magnitude_mask(delta: "torch.Tensor", density: float) -> "torch.Tensor":
    """TIES' trim: the :func:`magnitude_count` entries of largest |δ|."""
    return topk_mask(delta.abs(), magnitude_count(density, delta.numel()))


def band_mask(delta: "torch.Tensor", density: float, gamma: float) -> "torch.Tensor":
    """Breadcrumbs' band: entries ranked skip+1 .. skip+keep by |δ| (:func:`band_bounds`)."""
    key = delta.abs()
    skip, keep = band_bounds(density, gamma, delta.numel())
    return topk_mask(key, skip + keep) & ~topk_mask(key, skip)


def _draws(seed: int, start: int, n: int) -> "torch.Tensor":
    import torch

    return torch.cat([torch.from_numpy(uniform(seed, start + a, min(_CHUNK, n - a)))
                      for a in range(0, n, _CHUNK)]) if n else torch.zeros(0)


def random_mask(delta: "torch.Tensor", density: float, seed: int, start: int = 0) -> "torch.Tensor":
    """DARE's drop: element i is kept iff uᵢ < d, uᵢ = uniform(seed, start + i)."""
    u = _draws(seed, start, delta.numel()).double()
    return (u < density).reshape(delta.shape)


def keep_probabilities(delta: "torch.Tensor", density: float, epsilon: float) -> "torch.Tensor":
    """DELLA's keep probability of each entry (float64): pⱼ = (d − ε) + 2ε·ρⱼ, where
    ρⱼ = (rⱼ − 1)/(L − 1) and rⱼ ∈ 1..L is the rank of |δⱼ| within its row of L entries
    (:func:`row_layout`), smallest first. A row of one entry keeps it with probability d; d ≤ 0
    keeps nothing."""
    import torch

    outer, length, inner = row_layout(tuple(delta.shape))
    if density <= 0:
        return torch.zeros(delta.shape, dtype=torch.float64)
    if length <= 1:
        return torch.full(delta.shape, float(density), dtype=torch.float64)
    rows = delta.abs().reshape(outer, length, inner).transpose(1, 2).reshape(-1, length)
    # position from the top in the total order: a stable descending sort keeps equal |δ| in index order
    order = torch.sort(rows, dim=1, descending=True, stable=True).indices
    top = torch.empty_like(order)
    top.scatter_(1, order, torch.arange(length).expand_as(order).contiguous())
    rho = (length - 1 - top).double() / float(length - 1)
    p = (density - epsilon) + rho * (2 * epsilon)
    return p.reshape(outer, inner, length).transpose(1, 2).reshape(delta.shape)


def ranked_mask(delta: "torch.Tensor", density: float, epsilon: float, seed: int,
                start: int = 0) -> "torch.Tensor":
    """DELLA's drop: element j is kept iff uⱼ < pⱼ (:func:`keep_probabilities`)."""
    u = _draws(seed, start, delta.numel()).double().reshape(delta.shape)
    return u < keep_probabilities(delta, density, epsilon)


def abs_sum(x: "torch.Tensor") -> float:
    """Σ|x| over the finite entries of a float32 tensor, computed exactly and rounded once to
    float64, so it does not depend on the order of summation (the kernels compute the same number
    bit for bit, whatever their threads). The 24-bit significands are added per binary exponent
    in int64, and the per-exponent totals combined as one Python integer of units of 2⁻¹⁴⁹."""
    import torch

    buckets = torch.zeros(256, dtype=torch.int64)
    flat = x.reshape(-1)
    for a in range(0, flat.numel(), _CHUNK):
        bits = flat[a:a + _CHUNK].contiguous().view(torch.int32) & 0x7FFFFFFF
        exponent = bits >> 23
        significand = (bits & 0x7FFFFF) | ((exponent > 0).to(torch.int32) << 23)
        buckets.index_add_(0, exponent, significand.long())
    # exponent 255 holds inf and NaN: left out
    units = sum(s << (max(e, 1) - 1) for e, s in enumerate(buckets.tolist()[:255]) if s)
    return math.ldexp(float(units), -149)  # int → float rounds to nearest even


def rescale_factor(delta: "torch.Tensor", mask: "torch.Tensor") -> float | None:
    """s = Σ|δ| / Σ|m⊙δ| rounded to float32 (:func:`abs_sum`), or None where either sum is below
    1e-7 (nothing is rescaled then). The kept entries times s have the L1 norm of δ."""
    import numpy as np
    import torch

    before = abs_sum(delta)
    after = abs_sum(torch.where(mask, delta, 0.0))
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return None
    return float(np.float32(before / after))


def sparsify(delta: "torch.Tensor", mode: str, density: float, *, gamma: float = 0.0,
             epsilon: float = 0.0, seed: int = 0, start: int = 0, rescale: bool = False) -> "torch.Tensor":
    """δ̂: δ on the entries ``mode`` keeps and 0 elsewhere, times :func:`rescale_factor` when
    ``rescale``. ``mode`` "none" and densities d ≥ 1 return δ itself."""
    import torch

    if mode == "none" or density >= 1:
        return delta
    if mode == "magnitude":
        mask = magnitude_mask(delta, density)
    elif mode == "random":
        mask = random_mask(delta, density, seed, start)
    elif mode == "band":
        mask = band_mask(delta, density, gamma)
    elif mode == "ranked":
        mask = ranked_mask(delta, density, epsilon, seed, start)
    else:
        raise ValueError(f"unknown sparsification {mode!r}; use one of {', '.join(MODES)}")
    factor = rescale_factor(delta, mask) if rescale else None
    return torch.where(mask, delta if factor is None else delta * factor, 0.0)
