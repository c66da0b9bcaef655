"""arcee_fusion: keep only the other model's most important changes, by a dynamic threshold on
|δ| times the KL divergence of each row's softmax (in float64, so that both kernel paths keep the
same entries)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import fusion
from fusion.api import vectors
from fusion.api.strategy import float32_note

if TYPE_CHECKING:
    import torch


#: rows whose divergences are computed at once (bounds the float64 temporaries)
_ROWS = 1 << 20
#: a row divergence below this is 0: the rows' softmaxes agree to ~1e-12 and the float64 sum is
#: their rounding (a row shifted by a constant has the same softmax, yet sums to ±1e-19 or so), which
#: the two kernel paths, with their own exp and log1p, round differently (the C kernel's twin)
KL_FLOOR = 1e-12


def row_divergence(base: "torch.Tensor", other: "torch.Tensor") -> "torch.Tensor":
    """KL(p‖q) = Σ p·log(p/q) of each row (along the last axis; a tensor of fewer than 2
    dimensions is one row), p = softmax(θ₁'s row) + 1e-8, q = softmax(θ₀'s row) + 1e-8: in float64,
    0 below :data:`KL_FLOOR`, rounded to float32, one float per row."""
    import torch

    rows, cols = vectors.matrix_shape(tuple(other.shape), "rows")
    rows_o, rows_b = other.reshape(rows, cols), base.reshape(rows, cols)
    step = max(1, _ROWS // max(cols, 1))
    out = torch.empty(rows_o.shape[0], dtype=torch.float32)
    for r in range(0, rows_o.shape[0], step):
        p = torch.softmax(rows_o[r:r + step].double(), dim=-1) + 1e-8
        q = torch.softmax(rows_b[r:r + step].double(), dim=-1) + 1e-8
        # log(p/q) as log1p((p − q)/q): p − q is exact where p ≈ q, so a divergence of nearly equal
        # rows keeps its precision (and the C kernel, summing in another order, its float32 value)
        kl = (p * torch.log1p((p - q) / q)).sum(dim=-1)
        out[r:r + step] = torch.where(kl.abs() < KL_FLOOR, 0.0, kl)
    return out


def importance(base: "torch.Tensor", other: "torch.Tensor") -> "torch.Tensor":
    """I = |θ₁ − θ₀| times the row's divergence (both float32)."""
    kl = row_divergence(base, other)
    return ((other - base).abs_().reshape(vectors.matrix_shape(tuple(other.shape), "rows")) * kl[:, None]
            ).reshape(other.shape)


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

    def deviations(self, params, compute_dtype):
        notes = [float32_note(self.name, compute_dtype),
                 "arcee_fusion's divergences: fusion computes each row's KL in float64, mergekit in the inputs' dtype "
                 "(float32 at best), where rows whose softmaxes nearly agree get mostly rounding noise, so other "
                 "entries can pass the threshold; and fusion's quartiles are exact, where mergekit samples 10⁶ "
                 "importances of a larger tensor"]
        return [n for n in notes if n]

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

    def merge_compiled(self, out, base, tensors, params, context, *, threads, release):
        from fusion.api import kernels

        return kernels.kl_outlier_merge(out, base, tensors[0], shape=context.shape, threads=threads,
                                        release=release)


@fusion.hookimpl
def register_strategies(register: Callable[[fusion.Strategy], None]) -> None:
    register(ArceeFusion())
