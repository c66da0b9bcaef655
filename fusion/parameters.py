"""Strategy parameters in a config: checked against the strategy's declaration, then resolved per
tensor.

A value is a scalar, a gradient or a filter list (see :mod:`fusion.config`). A gradient is
interpolated piecewise-linearly over the layer position t ∈ [0, 1] (layer i of L has
t = i/(L−1); embeddings t = 0; final norm and lm_head t = 1); in a filter list the first entry
whose filter is a substring of the tensor's name (output or canonical) applies, and an entry
without a filter is the default.
"""

from __future__ import annotations

from typing import Any, Mapping

from .api.strategy import Strategy
from .config import MergeConfig, ModelEntry
from .configfile import Problems


def check_parameters(config: MergeConfig, strategy: Strategy, problems: Problems | None = None) -> None:
    """Every parameter in the config is declared by the strategy and every value is valid; all
    problems are reported together (into ``problems`` when given, else raised here)."""
    own = problems is None
    problems = problems or Problems(config.lines)
    names = ", ".join(p.name for p in strategy.parameters) or "none"

    def check(key: str, value: Any, path: str, per_model: bool) -> None:
        param = strategy.param(key)
        if param is None:
            problems.add(path, f"unknown parameter {key!r} for {strategy.name}; its parameters are: {names}")
        elif per_model and not param.per_model:
            problems.add(path, f"{key} is a global parameter of {strategy.name}; set it under the top-level "
                               f"`parameters`")
        else:
            with problems.collect():
                param.check_value(value, path, config.lines)

    for key, value in config.parameters.items():
        check(key, value, f"parameters.{key}", False)
    for entry in config.models:
        for key, value in entry.parameters.items():
            check(key, value, f"{entry.path}.parameters.{key}", True)
    for param in strategy.parameters:
        if not param.required or param.name in config.parameters:
            continue
        # the base model's entry needs no per-model value: it is not one of the merged models
        lacking = [e.path for e in config.models if param.name not in e.parameters
                   and not (strategy.base != "unused" and e.reference == config.base_model)] \
            if param.per_model else [""]
        if lacking:
            where = f" (in {', '.join(lacking)} or under the top-level `parameters`)" if param.per_model else ""
            problems.add("parameters", f"{strategy.name} needs {param.name}{where}; e.g. "
                                       f"`parameters: {{{param.name}: ...}}`")
    if own:
        problems.done()


def evaluate(value: Any, names: tuple[str, ...], t: float) -> Any:
    """The value of a parameter for one tensor (``names``: its output and canonical names)."""
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for entry in value:
            if "filter" not in entry or any(entry["filter"] in n for n in names):
                return evaluate(entry["value"], names, t)
        return None  # no filter matched and no default: the next level decides
    if isinstance(value, list):
        if len(value) == 1:
            return value[0]
        x = min(max(t, 0.0), 1.0) * (len(value) - 1)
        i = min(int(x), len(value) - 2)
        frac = x - i
        return value[i] * (1 - frac) + value[i + 1] * frac
    return value


def resolve_parameters(config: MergeConfig, strategy: Strategy, model_entries: list[ModelEntry],
                       names: tuple[str, ...], t: float) -> dict[str, Any]:
    """Per-tensor parameters: per-model values as lists, global ones as scalars.

    A per-model value comes from the model entry, then the top-level ``parameters``, then the
    declared default; a filter list with no match falls through to the next level.
    """
    out: dict[str, Any] = {}
    for param in strategy.parameters:
        fallback = evaluate(config.parameters.get(param.name), names, t)
        if fallback is None:
            fallback = param.default
        if param.per_model:
            values = []
            for entry in model_entries:
                v = evaluate(entry.parameters.get(param.name), names, t)
                values.append(fallback if v is None else v)
            out[param.name] = [param.type(v) if v is not None else v for v in values]
        else:
            out[param.name] = param.type(fallback) if fallback is not None else None
    return out
