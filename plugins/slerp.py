"""slerp and nuslerp: spherical linear interpolation between two tensors, or two task vectors.

Both reduce to the 2×2 Gram matrix of the two vectors (float64, :mod:`fusion.api.vectors`),
two coefficients per vector computed from it, and one linear combination. The two differ only in
how they treat short and (nearly) parallel vectors, as mergekit's do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import fusion
from fusion.api import vectors
from fusion.api.strategy import float32_deviations

if TYPE_CHECKING:
    import numpy as np


def _interpolate(t: float, theta: "np.ndarray", linear: "np.ndarray") -> "np.ndarray":
    """(c₀, c₁) per vector: sin((1−t)θ)/sin θ and sin(tθ)/sin θ, or 1−t and t where ``linear``."""
    import numpy as np

    theta = np.where(linear, 0.0, theta)  # keeps the unused branch finite
    sin = np.sin(theta)
    c0 = np.where(linear, 1.0 - t, np.sin((1.0 - t) * theta) / sin)
    c1 = np.where(linear, t, np.sin(t * theta) / sin)
    return np.stack([c0, c1], axis=-1)


def slerp_coefficients(g: "np.ndarray", t: float) -> "np.ndarray":
    """slerp's (c₀, c₁) per vector from its Gram matrix ``g`` (shape (V, 2, 2)).

    Norms ≤ 1e-8 count as 1 (a zero vector is then orthogonal to everything: θ = π/2), the
    cosine is clamped to [−1, 1], and |cos θ| > 0.9995 (nearly parallel or antiparallel)
    interpolates linearly. NaN stays NaN."""
    import numpy as np

    with np.errstate(all="ignore"):
        norms = np.sqrt(np.stack([g[:, 0, 0], g[:, 1, 1]]))
        norms = np.where(norms > 1e-8, norms, 1.0)
        cos = np.clip(g[:, 0, 1] / (norms[0] * norms[1]), -1.0, 1.0)
        return _interpolate(t, np.arccos(cos), np.abs(cos) > 0.9995)


#: nuslerp interpolates linearly where 1 − cos²θ is at most this
COLINEAR = 1e-12


def nuslerp_coefficients(g: "np.ndarray", t: float) -> "np.ndarray":
    """nuslerp's (c₀, c₁) per vector: norms clamped to ≥ 1e-7, linear only where the vectors
    are parallel or antiparallel to rounding, 1 − cos²θ ≤ 1e-12 (sin θ ≤ 1e-6): the cosine of
    exactly opposite vectors, a float64 quotient of sums, can miss −1 by a few 1e-16, and the
    spherical formula would divide by that sin θ."""
    import numpy as np

    with np.errstate(all="ignore"):
        norms = np.maximum(np.sqrt(np.stack([g[:, 0, 0], g[:, 1, 1]])), 1e-7)
        cos = np.clip(g[:, 0, 1] / (norms[0] * norms[1]), -1.0, 1.0)
        return _interpolate(t, np.arccos(cos), 1.0 - cos * cos <= COLINEAR)


class Slerp(fusion.Strategy):
    name = "slerp"
    description = ("Spherical linear interpolation from the base to the other model by t, the whole "
                   "tensor as one vector (linear where they are nearly parallel).")
    paper = "https://en.wikipedia.org/wiki/Slerp"
    base = "required"
    min_models = max_models = 1
    parameters = (
        fusion.Param("t", float, None, required=True,
                     help="0 gives the base, 1 the other model; values outside [0, 1] extrapolate"),
    )

    def merge(self, base, tensors, params, context):
        t = params["t"]
        if t == 0 or t == 1:
            return base if t == 0 else tensors[0]
        pair = [base, tensors[0]]
        return vectors.combination(pair, slerp_coefficients(vectors.gram(pair), t))

    def merge_compiled(self, out, base, tensors, params, context, *, threads, release):
        from fusion.api import kernels

        t = params["t"]
        if t == 0 or t == 1:
            # 1·x is x: that input exactly, in the output dtype
            endpoint = base if t == 0 else tensors[0]
            return kernels.combination(out, [endpoint], [[1.0]], threads=threads, release=release)
        pair = [base, tensors[0]]
        g = kernels.gram(pair, threads=threads, release=release)
        return kernels.combination(out, pair, slerp_coefficients(g, t), threads=threads, release=release)


def _nuslerp_t(weights: Sequence[float]) -> float:
    """t = w_B / (w_A + w_B), ½ where the weights sum to (nearly) 0."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _layout(params: Mapping[str, Any]) -> str:
    if params["nuslerp_flatten"]:
        return "tensor"
    return "columns" if params["nuslerp_row_wise"] else "rows"


class Nuslerp(fusion.Strategy):
    name = "nuslerp"
    description = ("Spherical interpolation between two models (or, with a base, their task vectors) "
                   "weighted by their weights, over the whole tensor or per row or column.")
    base = "optional"
    min_models = max_models = 2
    parameters = (
        fusion.Param("weight", float, None, per_model=True, required=True,
                     help="the model's weight; t = w₂/(w₁ + w₂) moves from the first model to the second"),
        fusion.Param("nuslerp_flatten", bool, True, help="the whole tensor is one vector"),
        fusion.Param("nuslerp_row_wise", bool, False,
                     help="without flatten: vectors along axis 0 (columns of a 2-D weight) instead of "
                          "the last axis (rows)"),
    )
    deviations = float32_deviations

    def merge(self, base, tensors, params, context):
        t = _nuslerp_t(params["weight"])
        if t == 0 or t == 1:
            return tensors[int(t)]
        layout = _layout(params)
        g = vectors.gram(tensors, base, layout)
        return vectors.combination(tensors, nuslerp_coefficients(g, t), base, layout)

    def merge_compiled(self, out, base, tensors, params, context, *, threads, release):
        from fusion.api import kernels

        t = _nuslerp_t(params["weight"])
        if t == 0 or t == 1:
            # 1·x is x: that input exactly, in the output dtype
            return kernels.combination(out, [tensors[int(t)]], [[1.0]], threads=threads, release=release)
        where = {"shape": context.shape, "vectors": _layout(params), "threads": threads, "release": release}
        g = kernels.gram(tensors, base, **where)
        return kernels.combination(out, tensors, nuslerp_coefficients(g, t), base, **where)


@fusion.hookimpl
def register_strategies(register: Callable[[fusion.Strategy], None]) -> None:
    register(Slerp())
    register(Nuslerp())
