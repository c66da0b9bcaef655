"""Strategy parameters resolved per tensor (they were checked against the strategy's declaration
when the config was read, see :mod:`fusion.config_checks`).

A value is a scalar, a gradient or a filter list (see :mod:`fusion.config`). A gradient is
interpolated piecewise-linearly over the position t ∈ [0, 1] of the layer in its output slice
(layer i of a slice of n layers has t = i/(n−1), a one-layer slice t = 1; embeddings, the final
norm and lm_head t = 0, as mergekit has it); a gradient of non-numbers (true/false) steps
instead. In a filter list the first entry whose filter is a substring of the tensor's name
applies, and an entry without a filter is the default; a list where nothing matches leaves the
value to the next level.

Levels, highest first: the model's own parameters (per-model parameters only: ``models[i]`` or
a slice source), then the output slice's, the module's, the top level's, then the declared
default. Per-model parameters test filters against the input model's tensor name, global ones
against the output's (they differ in layer-stacking merges).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .api.params import Param
from .api.strategy import Strategy


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def evaluate(value: Any, names: tuple[str, ...], t: float) -> Any:
    """The value of a parameter for one tensor (``names``: its full and canonical names)."""
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for entry in value:
            if "filter" not in entry or entry["filter"] in (None, "*") or any(entry["filter"] in n for n in names):
                return evaluate(entry["value"], names, t)
        return None  # no filter matched and no default: the next level decides
    if isinstance(value, list):
        if not value:
            return None
        if len(value) == 1:
            return value[0]
        x = min(max(t, 0.0), 1.0) * (len(value) - 1)
        if not all(_is_number(v) for v in value):
            return value[int(x)]  # a step through values that cannot be interpolated
        i = min(int(x), len(value) - 2)
        frac = x - i
        return value[i] * (1 - frac) + value[i + 1] * frac
    return value


def resolve_parameters(strategy: Strategy, shared: Sequence[Mapping[str, Any]],
                       inputs: Sequence[tuple[Mapping[str, Any], tuple[str, ...]]],
                       names: tuple[str, ...], t: float) -> dict[str, Any]:
    """Per-tensor parameters: per-model values as lists (in ``inputs`` order), global ones as
    scalars; None where a parameter without a default has no value.

    ``shared`` are the levels above the models, highest first (slice, module, top level);
    ``inputs`` gives each merged model's own parameters and the names of its input tensor.
    """
    def first(levels: Sequence[Mapping[str, Any]], param: Param, tensor: tuple[str, ...]) -> Any:
        """The value of the highest level that has one, else the default, coerced."""
        for level in levels:
            value = evaluate(level.get(param.name), tensor, t)
            if value is not None:
                return param.coerce(value)
        return None if param.default is None else param.coerce(param.default)

    out: dict[str, Any] = {}
    for param in strategy.parameters:
        if param.per_model:
            out[param.name] = [first([own, *shared], param, tensor) for own, tensor in inputs]
        else:
            out[param.name] = first(shared, param, names)
    return out
