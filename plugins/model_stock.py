"""model_stock: move from the base toward the models' average by an amount set by how well their
task vectors agree (Model Stock)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import fusion
from fusion.api import vectors
from fusion.api.strategy import float32_deviations

if TYPE_CHECKING:
    import numpy as np


def model_stock_coefficients(g: "np.ndarray") -> "np.ndarray":
    """t/N for each of the N task vectors, per vector, from their Gram matrices ``g`` (V, N, N).

    cᵢⱼ = clamp(δᵢ·δⱼ / max(‖δᵢ‖‖δⱼ‖, 1e-6), −1, 1), c their mean over the pairs i < j,
    t = N·c / (1 + (N−1)·c), or 0 where |1 + (N−1)·c| < 1e-6 (not clamped otherwise)."""
    import numpy as np

    count = g.shape[1]
    with np.errstate(all="ignore"):
        norms = np.sqrt(np.maximum(np.diagonal(g, axis1=1, axis2=2), 0.0))
        pairs = [np.clip(g[:, i, j] / np.maximum(norms[:, i] * norms[:, j], 1e-6), -1.0, 1.0)
                 for i in range(count) for j in range(i + 1, count)]
        cos = sum(pairs) / len(pairs)
        denominator = 1.0 + (count - 1) * cos
        t = np.where(np.abs(denominator) < 1e-6, 0.0, count * cos / denominator)
    return np.repeat((t / count)[:, None], count, axis=1)


def _layout(params) -> str:
    return "rows" if params["filter_wise"] else "tensor"


class ModelStock(fusion.Strategy):
    name = "model_stock"
    description = ("Model Stock: θ₀ + t·(mean of the models − θ₀), with t from the mean cosine between "
                   "the task vectors, per tensor or per row.")
    paper = "https://arxiv.org/abs/2403.19522"
    base = "required"
    min_models = 2
    parameters = (
        fusion.Param("filter_wise", bool, False,
                     help="one t per row (vectors along the last axis) instead of per tensor"),
    )
    deviations = float32_deviations

    def merge(self, base, tensors, params, context):
        layout = _layout(params)
        g = vectors.gram(tensors, base, layout)
        return vectors.combination(tensors, model_stock_coefficients(g), base, layout)

    def merge_compiled(self, out, base, tensors, params, context, *, threads, release):
        from fusion.api import kernels

        where = {"shape": context.shape, "vectors": _layout(params), "threads": threads, "release": release}
        g = kernels.gram(tensors, base, **where)
        return kernels.combination(out, tensors, model_stock_coefficients(g), base, **where)


@fusion.hookimpl
def register_strategies(register: Callable[[fusion.Strategy], None]) -> None:
    register(ModelStock())
