"""Exact top-k selection, shared by the built-in strategies and open to third-party plugins.

docs/strategies.md's rule: "top-k by key" keeps exactly k positions with the largest key, and ties at the
k-th key go to the lower flat (row-major) index; k = floor(x·n). Every kernel must reproduce
these masks bit for bit, so the rule lives in one place.

The k-th largest key is found by selection (``torch.kthvalue``), not by sorting the tensor: a
full argsort costs n·log n time and an int64 index per element, which hurts on embedding-sized
tensors.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing a plugin must not import torch (see fusion/strategy.py)
    import torch

__all__ = ["topk_count", "topk_mask"]


def topk_count(fraction: float, n: int) -> int:
    """k = floor(fraction · n), the number of positions a density/select_topk of ``fraction``
    keeps out of ``n``.

    The product is taken in float64, exactly as Python computes it (so floor(0.29 · 100) = 28,
    because 0.29 · 100 = 28.999999999999996); every kernel must use this function, or the same
    float64 product, to agree on k.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, not {n}")
    return min(n, max(0, math.floor(fraction * n)))


def topk_mask(key: "torch.Tensor", k: int) -> "torch.Tensor":
    """A bool tensor shaped like ``key`` that is true on exactly ``k`` positions: those with the
    largest keys, ties at the k-th largest key broken in favour of the lower flat index.

    -0.0 and 0.0 are equal keys. NaN is not expected, but if present it ranks above every number
    (as in ``torch.sort``), so the mask still has exactly ``k`` entries.
    """
    import torch

    n = key.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k = {k} is out of range for a tensor of {n} elements")
    if k == n:
        return torch.ones(key.shape, dtype=torch.bool, device=key.device)
    if k == 0:
        return torch.zeros(key.shape, dtype=torch.bool, device=key.device)

    flat = key.reshape(-1)
    # The k-th largest of n is the (n − k + 1)-th smallest; kthvalue ranks NaN above numbers.
    threshold = torch.kthvalue(flat, n - k + 1).values
    if torch.isnan(threshold):
        above = torch.zeros(n, dtype=torch.bool, device=key.device)
        at = torch.isnan(flat)
    else:
        # ~(x <= t) rather than x > t, so that NaN keys count as above the threshold.
        above = ~(flat <= threshold)
        at = flat == threshold
    still_needed = k - int(above.sum())
    # nonzero() lists positions in increasing flat order, which is exactly the tie-break; its
    # size is the number of ties, not n.
    tied_first = torch.nonzero(at).squeeze(1)[:still_needed]
    mask = above
    mask[tied_first] = True
    return mask.reshape(key.shape)
