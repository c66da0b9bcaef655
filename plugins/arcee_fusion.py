"""arcee_fusion: keep only the other model's most important changes, by a dynamic threshold on
|δ| times the KL divergence of each row's softmax."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import fusion

if TYPE_CHECKING:
    import torch


def importance(base: "torch.Tensor", other: "torch.Tensor") -> "torch.Tensor":
    """I = |θ₁ − θ₀| · KL(p‖q) per row (along the last axis; a tensor of fewer than 2 dimensions
    is one row), p = softmax(θ₁) + 1e-8, q = softmax(θ₀) + 1e-8, KL = Σ p·log(p/q)."""
    import torch

    rows = other.reshape(1, -1) if other.dim() < 2 else other
    base_rows = base.reshape(rows.shape)
    p = torch.softmax(rows, dim=-1) + 1e-8
    q = torch.softmax(base_rows, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return ((rows - base_rows).abs_() * kl).reshape(other.shape)


def quantile_positions(n: int) -> tuple[int, int, int]:
    """The 0-based ranks ⌊q·(n−1)⌋ of the quartiles q = ¼, ½, ¾ among n sorted values."""
    return (n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4


class ArceeFusion(fusion.Strategy):
    name = "arcee_fusion"
    description = ("Keep the other model's changes whose importance |δ|·KL(softmax) reaches "
                   "median + 1.5·IQR of the tensor's importances; elsewhere the base.")
    paper = "https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration"
    base = "required"
    min_models = max_models = 1

    def merge(self, base, tensors, params, context):
        import torch

        other = tensors[0]
        if other.numel() == 0:
            return base
        scores = importance(base, other)
        flat = scores.reshape(-1)
        # order statistics by selection, over every element (exact, no sampling)
        q1, median, q3 = (torch.kthvalue(flat, k + 1).values for k in quantile_positions(flat.numel()))
        threshold = median + 1.5 * (q3 - q1)
        keep = scores >= threshold
        del scores, flat
        return base + other.sub_(base).mul_(keep)


@fusion.hookimpl
def register_strategies(register: Callable[[fusion.Strategy], None]) -> None:
    register(ArceeFusion())
