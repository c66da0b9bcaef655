"""Planning a merge: for every output tensor, its inputs in every model, the strategy and the
resolved parameters — or the model it is carried from, and why.

The output has the tensors of the layout model (``layout_from``, default the base model, else
the first model), in its order and names; a ``slices:`` config replaces its layers by the
stacked output layers (:mod:`fusion.layermap`). Tensors of different models line up through
canonical names from each model's architecture spec; nothing of the layout model is dropped.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from .api.architecture import PART_NAMES, TensorRole, part_of
from .api.dtypes import DTYPES, nbytes
from .api.errors import ConfigError, ConfigErrors, FusionError, MergeError
from .api.modelfiles import is_tokenizer_file, support_files
from .api.random import tensor_seed
from .api.resolver import ResolveOptions
from .api.strategy import Strategy, TensorContext
from .checkpoint import TensorInfo
from .config import MergeConfig
from .config_checks import check_config, count_problem
from .configfile import Problems
from .host import clash, get_strategy
from .layermap import POST_ROLES, LayerMap, OutputSlice, build_layer_map, input_canonical, output_config
from .models import Model, ModelSet
from .parameters import resolve_parameters

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
    #: the rows of each merge source in the output vocabulary (a built tokenizer), else None
    vocab: Any = None

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
    models: list[Model]  # the merged models, each once, in config order
    layout: Model
    tensors: list[TensorPlan]
    notices: list[str]
    resolve_options: ResolveOptions
    random_seed: int | None = None  # the seed in use, for strategies that draw random numbers
    layers: LayerMap | None = None  # which input layers every output layer comes from
    output_config: dict = field(default_factory=dict)  # the output's config.json
    vocabulary: Any = None  # the output vocabulary of a built tokenizer (fusion.vocabulary)
    also_read: list[Model] = field(default_factory=list)  # models read for other things (a tokenizer)

    @property
    def inputs(self) -> list[Model]:
        """Every distinct model the merge reads."""
        seen: dict = {}
        sources = [src.model for s in self.layers.slices for src in s.sources] if self.layers else []
        for m in ([self.base] if self.base else []) + self.models + sources + [self.layout] + self.also_read:
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


def _missing_message(name: str, role: TensorRole, model: Model, layout: Model, owner: Model) -> str:
    part = part_of(role.role)
    whose = "the layout model" if owner is layout else owner.label
    where = f"tensor {name} of {whose} (canonical {role.canonical}) is missing in {model.label}"
    if part in ("vision_tower", "projector"):
        return (f"{where}; a {PART_NAMES[part]} can be merged only when every model has one: remove "
                f"{part} from merge_parts")
    if owner.spec.classify(name) is None:
        return (f"{where} and the {layout.spec.name} architecture does not know it; set "
                f"`carry_unmatched: true` to carry it from the layout model")
    return (f"{where}; the models must share a backbone (`fusion plan` shows the mapping), or set "
            f"`carry_unmatched: true` to carry such tensors from the layout model")


def _open_all(config: MergeConfig, opened: ModelSet) -> None:
    """Open every model the config names, reporting every one that cannot be opened at once."""
    where = {}
    if config.base_model:
        where[config.base_model] = "base_model"
    for e in config.models:
        where.setdefault(e.reference, e.path)
    for s in config.slices or ():
        if s.base_model:
            where.setdefault(s.base_model, f"{s.path}.base_model")
        for src in s.sources:
            where.setdefault(src.reference, src.path)
    if config.layout_from:
        where.setdefault(config.layout_from, "layout_from")
    if config.tokenizer is not None and config.tokenizer.source_model:
        where.setdefault(config.tokenizer.source_model, f"{config.tokenizer.path}")
    failed: list[FusionError] = []
    for reference, path in where.items():
        try:
            opened.open(reference, path)
        except FusionError as exc:
            failed.append(exc)
    if len(failed) == 1:
        raise failed[0]
    if failed:
        raise ConfigErrors([e if isinstance(e, ConfigError) else ConfigError("", str(e)) for e in failed])


def _check(config: MergeConfig) -> tuple[Strategy, list[str]]:
    """The config's own problems and what it and the strategy must agree on (parameters, base
    model, model counts), all reported together before any model is opened; returns the
    strategy and the notes of the check."""
    problems = Problems(config.lines)
    problems.errors += config.problems
    strategy = None
    if config.merge_method:
        with problems.collect():
            strategy = get_strategy(config.merge_method, "merge_method", config.line("merge_method"))
    if strategy is not None:
        check_config(config, strategy, problems)
    problems.done()
    return strategy, problems.notes


def build_plan(config: MergeConfig, options: ResolveOptions | None = None, *,
               random_seed: int | None = None) -> Plan:
    """Open the models ``config`` names and plan every output tensor; ``random_seed`` overrides
    the config's."""
    options = options or ResolveOptions(base_dir=config.base_dir)
    strategy, checked = _check(config)
    opened = ModelSet(options)
    notices = opened.notices
    notices += [n for n in config.notices + checked if n not in notices]
    if (note := clash("strategy", strategy.name)) is not None:
        notices.append(note)
    _open_all(config, opened)
    base = opened.open(config.base_model, "base_model") if config.base_model else None
    strategy_base = base if strategy.base != "unused" else None
    merged = []
    for entry in config.models:
        m = opened.open(entry.reference, entry.path)
        if strategy_base is not None and m is strategy_base:
            notices.append(f"{entry.path} is the base model; it is left out of the merge (it is the base, not "
                           f"one of the merged models)")
            continue
        merged.append((m, entry))
    if config.slices is None:
        if not merged:
            raise config.error("models", "there is nothing to merge: every model is the base model; "
                                         "list the fine-tuned models under `models`")
        _check_model_count(config, strategy, len(merged))
        first = merged[0][0]
    else:
        first = opened.open(config.slices[0].sources[0].reference, config.slices[0].sources[0].path)
    layout = opened.open(config.layout_from, "layout_from") if config.layout_from else base or first
    seed = random_seed if random_seed is not None else config.random_seed
    if strategy.random and seed is None:
        seed = secrets.randbits(32)
        notices.append(f"random_seed was not set, so {seed} was drawn; add `random_seed: {seed}` "
                       f"(or --random-seed {seed}) to repeat this merge exactly")
    layers = build_layer_map(config, opened, strategy_base, merged, layout, strategy.base)
    models = list({id(src.model): src.model for s in layers.slices for src in s.merged}.values())
    plan = Plan(config, strategy, base, models, layout, [], notices, options,
                seed if strategy.random else None, layers)
    if config.tokenizer is not None:
        from .vocabulary import build_vocabulary

        plan.vocabulary = build_vocabulary(plan, opened)
    elif config.chat_template is not None and not any(is_tokenizer_file(f) for f in
                                                      support_files(layout.folder, layout.label)):
        notices.append(f"chat_template: {layout.label} has no tokenizer to give the template to, so none is "
                       f"written")
    _plan_tensors(plan)
    _note_unused(plan)
    if not layers.identity:
        notices.append(f"the output has {layers.num_layers} layers, stacked from {len(layers.slices)} slice(s) "
                       f"(the layout model has {layout.num_layers})")
    plan.output_config = output_config(layout, layers, plan.vocabulary.size if plan.vocabulary else None)
    notices += [n for n in _deviations(plan) if n not in notices]
    return plan


def _check_model_count(config: MergeConfig, strategy: Strategy, count: int) -> None:
    """The count again once the models are opened: two references may name one folder."""
    problem = count_problem(strategy, count, config.base_model)
    if problem is not None:
        raise config.error("models", problem)


def _plan_tensors(plan: Plan) -> None:
    config, layout, notices, layers = plan.config, plan.layout, plan.notices, plan.layers
    if layers.identity and layout not in plan.models and layout is not plan.base:
        notices.append(f"{layout.label} is not one of the merged models: the output takes its layout and "
                       f"unmerged parts, and the merge of the others replaces its merged tensors")
    layout_parts = {part_of(r.role) for r in layout.roles.values()}
    for part in config.merge_parts or ():
        if part not in layout_parts:
            notices.append(f"merge_parts names {part}, but the layout model has no {PART_NAMES[part]}")
    unmatched: list[str] = []
    bad_params: dict[str, list[str]] = {}  # the strategy's own check: problem → tensors
    for name, role, template, tname, layer in layers.skeleton(layout):
        info = template.checkpoint.tensors[tname]
        canonical = input_canonical(template, tname, layer) if layer is not None else role.canonical
        tp = TensorPlan(name, canonical, role.role, layer, info.shape, info.dtype, "carry",
                        carry_from=(template, info))
        plan.tensors.append(tp)
        part = part_of(role.role)
        merge = role.merge if config.merge_parts is None or part == "other" else part in config.merge_parts
        if not merge:
            tp.note = f"{PART_NAMES.get(part, part)}: carried from the layout model"
            continue
        if not DTYPES[info.dtype].floating:
            tp.note = f"{info.dtype} is not a floating-point dtype: carried from the layout model"
            continue
        if layer is not None:
            s, i = layers.slice_of(layer)
            wanted = [(src, input_canonical(template, tname, src.start + i)) for src in s.sources]
        else:
            s, i = layers.slices[-1 if role.role in POST_ROLES else 0], None
            wanted = [(src, canonical) for src in s.sources]
        found = [(src, src.model.lookup(c)) for src, c in wanted]
        missing = [src for src, found_info in found if found_info is None]
        if missing:
            if config.carry_unmatched:
                whose = "the layout model" if template is layout else template.label
                tp.note = f"not in {missing[0].model.label}: carried from {whose} (carry_unmatched)"
                unmatched.append(name)
                continue
            raise MergeError(_missing_message(tname, role, missing[0].model, layout, template))
        sources = [(src.model, found_info) for src, found_info in found]
        if plan.vocabulary is not None and role.role in VOCAB_ROLES:
            tp.vocab = plan.vocabulary.rows(name, [m for m, _ in sources], [f for _, f in sources])
            tp.shape = (plan.vocabulary.size, *info.shape[1:])
            tp.note = plan.vocabulary.note
        else:
            _match_shapes(tp, info, sources, notices)
        tp.action = "merge"
        tp.carry_from = None
        if config.output_dtype:
            tp.dtype = config.output_dtype
        if s.base is not None:
            tp.base, sources = sources[0], sources[1:]
        tp.inputs = sources
        _resolve(plan, tp, s, i, [(src, f) for src, f in found if src is not s.base])
        checked = plan.strategy.check(tp.params, tp.context) or ()
        for problem in [checked] if isinstance(checked, str) else checked:
            bad_params.setdefault(problem, []).append(name)
    _report_parameter_problems(config, plan.strategy, bad_params)
    if unmatched:
        notices.append(f"carry_unmatched: {len(unmatched)} tensors of the layout model that another model "
                       f"lacks were carried from the layout model (e.g. {unmatched[0]})")


def _resolve(plan: Plan, tp: TensorPlan, s: OutputSlice, i: int | None, merged: list) -> None:
    """The tensor's parameters and the context the strategy is told."""
    config, strategy = plan.config, plan.strategy
    inputs = [(src.parameters, (info.name, src.model.roles[info.name].canonical)) for src, info in merged]
    shared = [s.parameters, config.module_parameters, config.parameters]
    tp.params = resolve_parameters(strategy, shared, inputs, (tp.name, tp.canonical),
                                   s.position(i) if i is not None else 0.0)
    for param in strategy.parameters:
        value = tp.params[param.name]
        if param.required and (value is None or (param.per_model and None in value)):
            where = f"{s.path}: " if s.path else ""
            raise MergeError(f"{where}no value of {param.name} for tensor {tp.name}: a filter list matches none of "
                             f"its names; add an entry without `filter` (the default) or set {param.name} at "
                             f"another level")
    merged_shape = tp.shape if tp.rows is None else (tp.rows, *tp.shape[1:])
    seed = tensor_seed(plan.random_seed, tp.name) if plan.random_seed is not None else 0
    tp.context = TensorContext(tp.name, tp.canonical, tp.role, tp.layer, plan.layers.num_layers, merged_shape,
                               seed=seed, models=tuple(m.label for m, _ in tp.inputs))


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
    """Say which tensors of the merged models the output leaves out (it follows the layout model;
    layers a slice does not take are left out on purpose)."""
    output = {t.canonical for t in plan.tensors}
    stacked = not plan.layers.identity
    for m in ([plan.base] if plan.base else []) + plan.models:
        extra = [c for c in m.by_canonical if c not in output
                 and not (stacked and m.roles[m.by_canonical[c]].layer is not None)]
        if m is not plan.layout and extra:
            parts: dict[str, int] = {}
            for c in extra:
                p = part_of(m.roles[m.by_canonical[c]].role)
                parts[p] = parts.get(p, 0) + 1
            detail = ", ".join(f"{PART_NAMES.get(p, p)}: {n}" for p, n in parts.items())
            plan.notices.append(f"{m.label} has {len(extra)} tensors the layout model does not have "
                                f"({detail}; e.g. {sorted(extra)[0]}); the output follows the layout model")


def _deviations(plan: Plan) -> list[str]:
    """The strategy's own lines on where it computes differently, on purpose, from mergekit's
    method of the same name, for the parameters this merge resolved."""
    merged = [t for t in plan.tensors if t.action == "merge"]
    if not merged:
        return []
    if plan.config.dtype:
        compute = DTYPES[plan.config.dtype].name
    else:  # mergekit computes each tensor in its inputs' dtype (promoted: bf16 with f16 or f32 is f32)
        groups = [{info.dtype for _, info in t.merge_sources} for t in merged]
        low = [g.pop() for g in groups if len(g) == 1 and g <= {"BF16", "F16"}]
        compute = DTYPES[max(set(low), key=low.count)].name if low else "float32"
    return list(plan.strategy.deviations([t.params for t in merged], compute))
