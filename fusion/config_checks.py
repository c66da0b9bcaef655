"""What a config and its strategy must agree on, checked before any model is opened: the
parameters at every level where they can be set, the required ones, the base model and how
many models each output slice merges. Every problem goes into one :class:`Problems`, so a
config's problems are reported in one run.

A parameter the strategy does not declare is an error, unless another registered strategy
declares it: then it is accepted and ignored with a note, as mergekit ignores what a method does
not take (published recipes give ``weight`` to ``model_stock``, ``normalize`` to ``slerp``).
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Iterator, Mapping

from .api.strategy import Strategy
from .config import MergeConfig
from .configfile import Problems
from .host import parameter_owners


def parameter_scopes(config: MergeConfig) -> Iterator[tuple[str, Mapping[str, Any], bool]]:
    """(config path, parameters, per-model?) for every place the config sets parameters."""
    yield "parameters", config.parameters, False
    if config.module_path:
        yield f"{config.module_path}.parameters", config.module_parameters, False
    for entry in config.models:
        yield f"{entry.path}.parameters", entry.parameters, True
    for s in config.slices or ():
        yield f"{s.path}.parameters", s.parameters, False
        for src in s.sources:
            yield f"{src.path}.parameters", src.parameters, True


def merged_inputs(config: MergeConfig, strategy: Strategy) -> list[tuple[str, list[tuple[str, str]], str | None]]:
    """Per output slice: its config path, its merged (path, reference) pairs and its base; the
    base model, where the strategy takes one, is not one of the merged models."""
    out = []
    uses_base = strategy.base != "unused"
    if config.slices is None:
        base = config.base_model if uses_base else None
        merged = [(e.path, e.reference) for e in config.models if not same_model(e.reference, base)]
        out.append(("models", merged, base))
    else:
        for s in config.slices:
            base = (s.base_model or config.base_model) if uses_base else None
            merged = [(src.path, src.reference) for src in s.sources if not same_model(src.reference, base)]
            out.append((s.path, merged, base))
    return out


def same_model(a: str | None, b: str | None) -> bool:
    """Whether two references name the same model as far as the config can tell (the planner
    compares the folders they resolve to): `./base` and `base/` are the same path."""
    return a is not None and b is not None and os.path.normpath(a) == os.path.normpath(b)


def check_parameters(config: MergeConfig, strategy: Strategy, problems: Problems) -> None:
    """Every parameter in the config is declared by the strategy (or, ignored, by another one)
    and every value is valid; the required ones are set for every merged model."""
    names = ", ".join(p.name for p in strategy.parameters) or "none"
    elsewhere = parameter_owners()
    for scope, params, per_model in parameter_scopes(config):
        for key, value in params.items():
            path = f"{scope}.{key}"
            param = strategy.param(key)
            if param is None and key in elsewhere:
                problems.note(path, f"{strategy.name} has no parameter {key!r} (it is one of "
                                    f"{elsewhere[key]}'s); it is ignored, as mergekit ignores it")
            elif param is None:
                close = difflib.get_close_matches(str(key), [p.name for p in strategy.parameters], n=1, cutoff=0.75)
                hint = f"did you mean `{close[0]}`? " if close else ""
                problems.add(path, f"unknown parameter {key!r} for {strategy.name}; {hint}its parameters are: {names}")
            elif per_model and not param.per_model:
                problems.add(path, f"{key} is a global parameter of {strategy.name}; set it under the top-level "
                                   f"`parameters`")
            else:
                with problems.collect():
                    param.check_value(value, path, config.lines)
    own = {e.path: e.parameters for e in config.models}
    own.update({src.path: src.parameters for s in config.slices or () for src in s.sources})
    scopes = {s.path: s.parameters for s in config.slices or ()}
    for param in strategy.parameters:
        if not param.required or param.name in config.parameters or param.name in config.module_parameters:
            continue
        for path, merged, _ in merged_inputs(config, strategy):
            if param.name in scopes.get(path, {}):
                continue
            lacking = [p for p, _ in merged if param.name not in own[p]] if param.per_model else [path]
            if not lacking:
                continue
            if path in scopes:
                where = ", ".join(lacking) + ", " if param.per_model else ""
                problems.add(path, f"{strategy.name} needs {param.name} (in {where}{path}.parameters or the "
                                   f"top-level `parameters`); e.g. `parameters: {{{param.name}: ...}}`")
            else:
                where = f" (in {', '.join(lacking)} or under the top-level `parameters`)" if param.per_model else ""
                problems.add("parameters", f"{strategy.name} needs {param.name}{where}; e.g. "
                                           f"`parameters: {{{param.name}: ...}}`")


def count_problem(strategy: Strategy, count: int, base: str | None, given: str = "the config gives",
                  key: str = "models") -> str | None:
    """Why ``strategy`` cannot merge ``count`` models (besides ``base``), or None when it can."""
    lo, hi = strategy.min_models, strategy.max_models
    if lo <= count and (hi is None or count <= hi):
        return None
    besides = " besides the base model" if strategy.base != "unused" and base else ""
    return f"{strategy.name} merges {strategy.models_text()} model(s){besides}, but {given} {count}; change `{key}`"


def check_models(config: MergeConfig, strategy: Strategy, problems: Problems) -> None:
    """The base model and the number of merged models of each output slice."""
    for path, merged, base in merged_inputs(config, strategy):
        in_slice = config.slices is not None
        if strategy.base == "required" and not base:
            problems.add("merge_method" if not in_slice else path,
                         f"{strategy.name} needs a base_model to take task vectors from; add "
                         f"`base_model: <path or Hub name>`" + (" (for the whole config or this slice)"
                                                                if in_slice else ""))
        given, key = ("this slice has", "sources") if in_slice else ("the config gives", "models")
        problem = count_problem(strategy, len(merged), base, given, key)
        if problem is not None:
            problems.add("models" if not in_slice else f"{path}.sources", problem)
    if config.slices is None and strategy.base == "unused" and config.base_model:
        if any(same_model(e.reference, config.base_model) for e in config.models):
            problems.note("base_model", f"{strategy.name} takes no base model: base_model is merged only because "
                                        f"it is listed under `models`; as base_model it only sets the layout "
                                        f"model (the output's config and tokenizer)")
        else:
            problems.note("base_model", f"{strategy.name} takes no base model: base_model only sets the layout "
                                        f"model (the output's config and tokenizer) and is not merged (mergekit "
                                        f"merges it as one more model); to merge it too, list it under `models`")


def check_config(config: MergeConfig, strategy: Strategy, problems: Problems) -> None:
    check_parameters(config, strategy, problems)
    if config.models or config.slices:  # else the config has been told it lists no models
        check_models(config, strategy, problems)
