"""Planning a merge: for every output tensor, its inputs in every model, the strategy and the
resolved parameters — or the model it is carried from, and why.

The output has exactly the tensors of the layout model (``layout_from``, default the base model,
else the first model), in its order and names. Tensors of different models line up through
canonical names from each model's architecture spec; nothing of the layout model is dropped.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from .api.architecture import PART_NAMES, TensorRole, part_of
from .api.dtypes import DTYPES, nbytes
from .api.errors import MergeError
from .api.random import tensor_seed
from .api.resolver import ResolveOptions
from .api.strategy import Strategy, TensorContext
from .checkpoint import TensorInfo
from .config import MergeConfig, ModelEntry
from .configfile import Problems
from .host import clash, get_strategy
from .models import Model, ModelSet
from .parameters import check_parameters, resolve_parameters

VOCAB_ROLES = ("embedding", "lm_head")


@dataclass
class TensorPlan:
    name: str
    canonical: str
    role: str
    layer: int | None
    shape: tuple[int, ...]
    dtype: str  # output safetensors dtype
    action: str  # "merge" | "carry"
    base: tuple[Model, TensorInfo] | None = None
    inputs: list[tuple[Model, TensorInfo]] = field(default_factory=list)
    carry_from: tuple[Model, TensorInfo] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    rows: int | None = None  # merge only these leading rows; the rest come from the layout model
    note: str = ""
    context: TensorContext | None = None  # what the strategy is told about the tensor

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)

    @property
    def merge_sources(self) -> list[tuple[Model, TensorInfo]]:
        """What the strategy reads: the base (when it takes one), then the models."""
        return ([self.base] if self.base else []) + self.inputs


@dataclass
class Plan:
    config: MergeConfig
    strategy: Strategy
    base: Model | None
    models: list[Model]  # the strategy's inputs, in order
    entries: list[ModelEntry]  # their config entries
    layout: Model
    tensors: list[TensorPlan]
    notices: list[str]
    resolve_options: ResolveOptions
    random_seed: int | None = None  # the seed in use, for strategies that draw random numbers

    @property
    def inputs(self) -> list[Model]:
        """Every distinct model the merge reads."""
        seen: dict = {}
        for m in ([self.base] if self.base else []) + self.models + [self.layout]:
            seen.setdefault(m.folder, m)
        return list(seen.values())

    def close(self) -> None:
        """Release the models' memory maps (idempotent)."""
        for m in self.inputs:
            m.checkpoint.close()

    def __enter__(self) -> "Plan":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def render(self) -> str:
        from .render import render

        return render(self)

    def describe(self) -> dict[str, Any]:
        from .render import describe

        return describe(self)


def _position(role: TensorRole, num_layers: int) -> float:
    """Where a tensor sits in the network, t ∈ [0, 1], for gradient parameters."""
    if role.layer is not None:
        return role.layer / (num_layers - 1) if num_layers > 1 else 0.0
    return 1.0 if role.role in ("final_norm", "lm_head") else 0.0


def _missing_message(name: str, role: TensorRole, model: Model, layout: Model) -> str:
    part = part_of(role.role)
    where = f"tensor {name} of the layout model (canonical {role.canonical}) is missing in {model.label}"
    if part in ("vision_tower", "projector"):
        return (f"{where}; a {PART_NAMES[part]} can be merged only when every model has one: remove "
                f"{part} from merge_parts")
    if layout.spec.classify(name) is None:
        return (f"{where} and the {layout.spec.name} architecture does not know it; set "
                f"`carry_unmatched: true` to carry it from the layout model")
    return (f"{where}; the models must share a backbone (`fusion plan` shows the mapping), or set "
            f"`carry_unmatched: true` to carry such tensors from the layout model")


def _check(config: MergeConfig) -> Strategy:
    """The config's own problems and what it and the strategy must agree on, all reported
    together before any model is opened."""
    problems = Problems(config.lines)
    problems.errors += config.problems
    strategy = None
    if config.merge_method:
        with problems.collect():
            strategy = get_strategy(config.merge_method, "merge_method", config.line("merge_method"))
    if strategy is not None:
        check_parameters(config, strategy, problems)
        if strategy.base == "required" and not config.base_model:
            problems.add("merge_method", f"{strategy.name} needs a base_model to take task vectors from; "
                                         f"add `base_model: <path or Hub name>`")
    problems.done()
    return strategy


def _check_model_count(config: MergeConfig, strategy: Strategy, count: int) -> None:
    lo, hi = strategy.min_models, strategy.max_models
    if count < lo or (hi is not None and count > hi):
        besides = " besides the base model" if strategy.base != "unused" and config.base_model else ""
        raise config.error("models", f"{strategy.name} merges {strategy.models_text()} model(s){besides}, "
                                     f"but the config gives {count}; change `models`")


def build_plan(config: MergeConfig, options: ResolveOptions | None = None, *,
               random_seed: int | None = None) -> Plan:
    """Open the models ``config`` names and plan every output tensor; ``random_seed`` overrides
    the config's."""
    options = options or ResolveOptions(base_dir=config.base_dir)
    strategy = _check(config)
    opened = ModelSet(options)
    notices = opened.notices
    if (note := clash("strategy", strategy.name)) is not None:
        notices.append(note)
    base = opened.open(config.base_model, "base_model") if config.base_model else None
    models, entries = [], []
    for entry in config.models:
        m = opened.open(entry.reference, entry.path)
        if base is not None and strategy.base != "unused" and m is base:
            notices.append(f"{entry.path} is the base model; it is left out of the merge (its task vector is zero)")
            continue
        models.append(m)
        entries.append(entry)
    if not models:
        raise config.error("models", "there is nothing to merge: every model is the base model; "
                                     "list the fine-tuned models under `models`")
    _check_model_count(config, strategy, len(models))
    if base is not None and strategy.base == "unused":
        notices.append(f"{strategy.name} merges base_model only where it is listed under `models`; as "
                       f"base_model it only sets the layout model (the output's config and tokenizer)"
                       if base in models else
                       f"{strategy.name} does not merge base_model: it only sets the layout model (the "
                       f"output's config and tokenizer); to merge it too, list it under `models`")
    layout = opened.open(config.layout_from, "layout_from") if config.layout_from else base or models[0]
    seed = random_seed if random_seed is not None else config.random_seed
    if strategy.random and seed is None:
        seed = secrets.randbits(32)
        notices.append(f"random_seed was not set, so {seed} was drawn; add `random_seed: {seed}` "
                       f"(or --random-seed {seed}) to repeat this merge exactly")
    plan = Plan(config, strategy, base, models, entries, layout, [], notices, options,
                seed if strategy.random else None)
    _plan_tensors(plan)
    _note_unused(plan)
    return plan


def _plan_tensors(plan: Plan) -> None:
    config, strategy, layout, notices = plan.config, plan.strategy, plan.layout, plan.notices
    strategy_base = plan.base if strategy.base != "unused" else None
    num_layers = layout.num_layers
    if layout not in plan.models and layout is not plan.base:
        notices.append(f"{layout.label} is not one of the merged models: the output takes its layout and "
                       f"unmerged parts, and the merge of the others replaces its merged tensors")
    layout_parts = {part_of(r.role) for r in layout.roles.values()}
    for part in config.merge_parts or ():
        if part not in layout_parts:
            notices.append(f"merge_parts names {part}, but the layout model has no {PART_NAMES[part]}")
    sources_of = ([strategy_base] if strategy_base else []) + plan.models
    unmatched: list[str] = []
    bad_params: dict[str, list[str]] = {}  # the strategy's own check: problem → tensors
    for name, info in layout.checkpoint.tensors.items():
        role = layout.roles[name]
        tp = TensorPlan(name, role.canonical, role.role, role.layer, info.shape, info.dtype, "carry",
                        carry_from=(layout, info))
        plan.tensors.append(tp)
        part = part_of(role.role)
        merge = role.merge if config.merge_parts is None or part == "other" else part in config.merge_parts
        if not merge:
            tp.note = f"{PART_NAMES.get(part, part)}: carried from the layout model"
            continue
        if not DTYPES[info.dtype].floating:
            tp.note = f"{info.dtype} is not a floating-point dtype: carried from the layout model"
            continue
        found = [(m, m.lookup(role.canonical)) for m in sources_of]
        sources = [(m, info_) for m, info_ in found if info_ is not None]
        missing = [m for m, info_ in found if info_ is None]
        if missing:
            if config.carry_unmatched:
                tp.note = f"not in {missing[0].label}: carried from the layout model (carry_unmatched)"
                unmatched.append(name)
                continue
            raise MergeError(_missing_message(name, role, missing[0], layout))
        _match_shapes(tp, info, sources, notices)
        tp.action = "merge"
        tp.carry_from = None
        if config.out_dtype:
            tp.dtype = config.out_dtype
        if strategy_base:
            tp.base, sources = sources[0], sources[1:]
        tp.inputs = sources
        tp.params = resolve_parameters(config, strategy, plan.entries, (name, role.canonical),
                                       _position(role, num_layers))
        merged_shape = info.shape if tp.rows is None else (tp.rows, *info.shape[1:])
        seed = tensor_seed(plan.random_seed, name) if plan.random_seed is not None else 0
        tp.context = TensorContext(name, role.canonical, role.role, role.layer, num_layers, merged_shape,
                                   seed=seed, models=tuple(m.label for m, _ in tp.inputs))
        if (problem := strategy.check(tp.params, tp.context)) is not None:
            bad_params.setdefault(problem, []).append(name)
    _report_parameter_problems(config, strategy, bad_params)
    if unmatched:
        notices.append(f"carry_unmatched: {len(unmatched)} tensors of the layout model that another model "
                       f"lacks were carried from the layout model (e.g. {unmatched[0]})")


def _report_parameter_problems(config: MergeConfig, strategy: Strategy, bad: dict[str, list[str]]) -> None:
    """The problems :meth:`Strategy.check` found, each with the first tensor it concerns, at once."""
    if not bad:
        return
    problems = Problems(config.lines)
    shown = list(bad.items())[:_SHOWN_PROBLEMS]
    for problem, names in shown:
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        problems.add("parameters", f"{strategy.name}: {problem} (tensor {names[0]}{more})")
    if len(bad) > len(shown):
        problems.add("parameters", f"{strategy.name}: {len(bad) - len(shown)} more problems of this kind "
                                   f"in other tensors")
    problems.done()


#: distinct parameter problems listed before the rest are only counted
_SHOWN_PROBLEMS = 3


def _match_shapes(tp: TensorPlan, info: TensorInfo, sources: list[tuple[Model, TensorInfo]],
                  notices: list[str]) -> None:
    """Equal shapes, or vocabulary rows: merge the rows every model has, carry the layout's rest."""
    shapes = [info.shape] + [s.shape for _, s in sources]
    if len(set(shapes)) == 1:
        return
    same_width = len({s[1:] for s in shapes}) == 1 and all(len(s) >= 1 for s in shapes)
    if not (tp.role in VOCAB_ROLES and same_width):
        detail = ", ".join(f"{m.label} has {list(s.shape)}" for m, s in sources)
        raise MergeError(f"shape mismatch for tensor {tp.name}: the layout model has {list(info.shape)}, "
                         f"{detail}; merged models must have the same sizes")
    tp.rows = min(s[0] for s in shapes)
    carried = info.shape[0] - tp.rows
    tp.note = (f"vocabulary: {tp.rows} common rows merged"
               + (f", {carried} rows only the layout model has carried from it" if carried else ""))
    if carried:
        notices.append(f"vocabulary of {tp.name}: rows 0..{tp.rows - 1} (common to all models) merged, "
                       f"rows {tp.rows}..{info.shape[0] - 1} ({carried}) carried from the layout model")


def _note_unused(plan: Plan) -> None:
    """Say which tensors of the merged models the output leaves out (it follows the layout model)."""
    output = {t.canonical for t in plan.tensors}
    for m in ([plan.base] if plan.base else []) + plan.models:
        extra = [c for c in m.by_canonical if c not in output]
        if m is not plan.layout and extra:
            parts: dict[str, int] = {}
            for c in extra:
                p = part_of(m.roles[m.by_canonical[c]].role)
                parts[p] = parts.get(p, 0) + 1
            detail = ", ".join(f"{PART_NAMES.get(p, p)}: {n}" for p, n in parts.items())
            plan.notices.append(f"{m.label} has {len(extra)} tensors the layout model does not have "
                                f"({detail}; e.g. {sorted(extra)[0]}); the output follows the layout model")
