"""multislerp and karcher: weighted means of several tensors on the hypersphere.

Every vector either method forms (unit vectors, their weighted mean, tangent vectors, each
iterate of the Karcher mean) is a linear combination of the inputs, so both are computed on the
coefficients of that combination, with the inputs' float64 Gram matrix G giving every dot product
(a·b = αᵀGβ for a = Σ αᵢxᵢ, b = Σ βᵢxᵢ). That is the formula's value without the rounding of
the intermediate vectors; the data are read twice: once for G, once for the result Σ cᵢxᵢ.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import fusion
from fusion.api import vectors
from fusion.api.strategy import float32_deviations

if TYPE_CHECKING:
    import numpy as np


def _norm(g: "np.ndarray", a: "np.ndarray") -> float:
    """‖Σ aᵢxᵢ‖ from the Gram matrix (a rounding below 0 counts as 0)."""
    return math.sqrt(max(float(a @ g @ a), 0.0))


def multislerp_coefficients(g: "np.ndarray", weights: Sequence[float], normalize: bool,
                            eps: float) -> "np.ndarray":
    """The coefficients cᵢ of multislerp's result Σ cᵢxᵢ for m ≥ 2 inputs of Gram matrix ``g``
    (m × m): the weighted mean m̄ of the unit vectors uᵢ = xᵢ/(‖xᵢ‖ + ε), normalised; the
    weighted tangent g = Σ wᵢ(uᵢ − (uᵢ·m̄)m̄) at it; r = m̄·cos τ + g·sin τ/τ with τ = ‖g‖ + ε;
    the result r·Σ wᵢ‖xᵢ‖."""
    import numpy as np

    w = np.asarray(weights, dtype=np.float64)
    if normalize:
        total = float(w.sum())
        if abs(total) < 1e-8:
            raise fusion.MergeError(f"the multislerp weights {list(weights)} sum to 0, so they cannot be "
                                    f"normalised; change the weights or set normalize_weights: false")
        w = w / total
    norms = np.sqrt(np.maximum(np.diagonal(g), 0.0))
    unit = 1.0 / (norms + eps)  # uᵢ = unit[i]·xᵢ
    mean = w * unit
    mean_norm = _norm(g, mean)
    if mean_norm < eps:  # nothing to project onto
        if len(w) == 2:
            return w
        raise fusion.MergeError(
            "the weighted mean of the models' directions is zero (opposite task vectors whose weights "
            "cancel); change the weights")
    mean = mean / mean_norm
    along = unit * (g @ mean)  # uᵢ·m̄
    tangent = w * unit - float((w * along).sum()) * mean
    tau = _norm(g, tangent) + eps
    result = mean * math.cos(tau) + tangent * (math.sin(tau) / tau)
    return result * float((w * norms).sum())


class Multislerp(fusion.Strategy):
    name = "multislerp"
    description = ("Barycentric interpolation on the hypersphere: the models' directions are averaged "
                   "in the tangent space at their weighted mean and mapped back, scaled by the mean norm.")
    paper = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    base = "optional"
    min_models = 1
    parameters = (
        fusion.Param("weight", float, None, per_model=True, required=True, help="the model's weight"),
        fusion.Param("normalize_weights", bool, True, help="divide the weights by their sum"),
        fusion.Param("eps", float, 1e-8, minimum=0.0, exclusive_minimum=True,
                     help="added to norms before dividing by them"),
    )
    deviations = float32_deviations

    def merge(self, base, tensors, params, context):
        if len(tensors) == 1:
            return tensors[0]
        g = vectors.gram(tensors, base)[0]
        c = multislerp_coefficients(g, params["weight"], params["normalize_weights"], params["eps"])
        return vectors.combination(tensors, c, base)

    def merge_compiled(self, out, base, tensors, params, context, *, threads, release):
        from fusion.api import kernels

        if len(tensors) == 1:
            # 1·x is x: that input exactly, in the output dtype
            return kernels.combination(out, [tensors[0]], [[1.0]], threads=threads, release=release)
        g = kernels.gram(tensors, base, threads=threads, release=release)[0]
        c = multislerp_coefficients(g, params["weight"], params["normalize_weights"], params["eps"])
        return kernels.combination(out, tensors, c, base, threads=threads, release=release)


#: sin θ below this (from dot products of unit vectors in float64) is rounding: opposite directions
_ANTIPODAL = 1e-7


def karcher_coefficients(g: "np.ndarray", max_iter: int, tol: float) -> "np.ndarray":
    """The coefficients cᵢ of the Karcher mean Σ cᵢxᵢ of m inputs of Gram matrix ``g``, each
    of weight 1/m: the unit vectors of the inputs with norm > tol, their normalised mean as the
    start, then up to ``max_iter`` Riemannian gradient steps (stopping when the step is < tol);
    the direction found, times the mean norm of all inputs."""
    import numpy as np

    m = len(g)
    alpha = 1.0 / m
    norms = np.sqrt(np.maximum(np.diagonal(g), 0.0))
    valid = [i for i in range(m) if norms[i] > tol]
    if not valid:
        return np.zeros(m)
    share = 1.0 / len(valid)  # α / Σ_valid α
    units = {i: np.eye(m)[i] / norms[i] for i in valid}
    mean = sum(share * units[i] for i in valid)
    mean_norm = _norm(g, mean)
    mean = units[valid[0]].copy() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        step = np.zeros(m)
        for i in valid:
            cos = min(max(float(mean @ g @ units[i]), -1.0), 1.0)
            theta = math.acos(cos)
            toward = units[i] - cos * mean
            # ‖uᵢ − cos θ·m‖ is sin θ; taken from G it is exact to rounding where uᵢ is opposite
            # the mean, which has no tangent direction: such an input adds no step
            sin = _norm(g, toward)
            if theta < tol or sin < _ANTIPODAL:
                continue
            step = step + share * (theta / sin) * toward
        length = _norm(g, step)
        if length < tol:
            break
        mean = math.cos(length) * mean + math.sin(length) * (step / length)
        mean_norm = _norm(g, mean)
        if mean_norm > tol:
            mean = mean / mean_norm
    return mean * float(alpha * norms.sum())


class Karcher(fusion.Strategy):
    name = "karcher"
    description = ("The Karcher (Riemannian) mean of the models' directions on the hypersphere, "
                   "scaled by their mean norm; every model weighs the same.")
    paper = "https://arxiv.org/abs/2603.04972"
    base = "unused"
    min_models = 1
    parameters = (
        fusion.Param("max_iter", int, 10, minimum=0, help="most gradient steps"),
        fusion.Param("tol", float, 1e-5, minimum=0.0,
                     help="stop when a step is shorter; inputs of smaller norm have no direction"),
    )
    deviations = float32_deviations

    def merge(self, base, tensors, params, context):
        if len(tensors) == 1:
            return tensors[0]
        g = vectors.gram(tensors)[0]
        return vectors.combination(tensors, karcher_coefficients(g, params["max_iter"], params["tol"]))

    def merge_compiled(self, out, base, tensors, params, context, *, threads, release):
        from fusion.api import kernels

        if len(tensors) == 1:
            # 1·x is x: that input exactly, in the output dtype
            return kernels.combination(out, [tensors[0]], [[1.0]], threads=threads, release=release)
        g = kernels.gram(tensors, threads=threads, release=release)[0]
        c = karcher_coefficients(g, params["max_iter"], params["tol"])
        return kernels.combination(out, tensors, c, threads=threads, release=release)


@fusion.hookimpl
def register_strategies(register: Callable[[fusion.Strategy], None]) -> None:
    register(Multislerp())
    register(Karcher())
