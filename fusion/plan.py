"""Planning a merge: for every output tensor, its inputs in every model, the strategy and the
resolved parameters — or the model it is carried from, and why.

The output has exactly the tensors of the layout model (``layout_from``, default the base model,
else the first model), in its order and names. Tensors of different models line up through
canonical names from each model's architecture spec; nothing of the layout model is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .api.architecture import PARTS, ArchitectureSpec, ExactNames, TensorRole, part_of
from .api.dtypes import DTYPES, nbytes
from .checkpoint import Checkpoint, TensorInfo, open_checkpoint
from .config import MergeConfig, ModelEntry, check_parameters, resolve_parameters
from .api.errors import MergeError
from .host import architectures, get_strategy
from .api.resolver import ResolveOptions
from .resolve import resolve
from .api.strategy import Strategy, TensorContext

VOCAB_ROLES = ("embedding", "lm_head")


@dataclass
class Model:
    """One opened input model with its architecture and canonical-name index."""

    reference: str
    label: str
    checkpoint: Checkpoint
    spec: ArchitectureSpec
    roles: dict[str, TensorRole] = field(default_factory=dict)
    by_canonical: dict[str, str] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.checkpoint.folder

    def lookup(self, canonical: str) -> TensorInfo | None:
        name = self.by_canonical.get(canonical)
        if name is None and canonical == self.spec.tied_pair[0]:
            name = self.by_canonical.get(self.spec.tied_pair[1])  # tied: the head is the embedding
        return self.checkpoint.tensors[name] if name is not None else None


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

    @property
    def inputs(self) -> list[Model]:
        """Every distinct model the merge reads."""
        seen: dict[Path, Model] = {}
        for m in ([self.base] if self.base else []) + self.models + [self.layout]:
            seen.setdefault(m.folder, m)
        return list(seen.values())

    def close(self) -> None:
        for m in self.inputs:
            m.checkpoint.close()


def detect(config: dict[str, Any]) -> ArchitectureSpec | None:
    best, best_score = None, 0
    for spec in architectures():  # later registrations win ties: a plugin can override a built-in
        score = spec.match_score(config)
        if score and score >= best_score:
            best, best_score = spec, score
    return best


def _open(reference: str, where: str, options: ResolveOptions, cache: dict[Path, Model],
          notices: list[str]) -> Model:
    folder = resolve(reference, options, where)
    key = folder.resolve()
    if key in cache:
        return cache[key]
    label = f"{where} ({reference})"
    ckpt = open_checkpoint(folder, label)
    spec = detect(ckpt.config)
    model = Model(reference, label, ckpt, spec or ExactNames())
    if spec is None:
        arch = ckpt.config.get("architectures") or ckpt.config.get("model_type") or "unknown"
        notices.append(f"{label}: architecture {arch} is not registered, so its tensors are matched "
                       f"by exact name (`fusion architectures` lists the known ones)")
    for name in ckpt.tensors:
        role = model.spec.classify(name) or TensorRole(canonical=name, role="other")
        model.roles[name] = role
        model.by_canonical.setdefault(role.canonical, name)
    cache[key] = model
    return model


def _position(role: TensorRole, num_layers: int) -> float:
    """Where a tensor sits in the network, t ∈ [0, 1], for gradient parameters."""
    if role.layer is not None:
        return role.layer / (num_layers - 1) if num_layers > 1 else 0.0
    return 1.0 if role.role in ("final_norm", "lm_head") else 0.0


_PART_NAMES = {"language_model": "language model", "vision_tower": "vision tower",
               "projector": "projector", "other": "other tensors"}


def _missing_message(name: str, role: TensorRole, model: Model, layout: Model) -> str:
    part = part_of(role.role)
    where = f"tensor {name} of the layout model (canonical {role.canonical}) is missing in {model.label}"
    if part in ("vision_tower", "projector"):
        return (f"{where}; a {_PART_NAMES[part]} can be merged only when every model has one: remove "
                f"{part} from merge_parts")
    if layout.spec.classify(name) is None:
        return (f"{where} and the {layout.spec.name} architecture does not know it; set "
                f"`carry_unmatched: true` to carry it from the layout model")
    return (f"{where}; the models must share a backbone (`fusion plan` shows the mapping), or set "
            f"`carry_unmatched: true` to carry such tensors from the layout model")


def build_plan(config: MergeConfig, options: ResolveOptions | None = None) -> Plan:
    options = options or ResolveOptions(base_dir=config.base_dir)
    strategy = get_strategy(config.merge_method, "merge_method", config.line("merge_method"))
    check_parameters(config, strategy)
    if strategy.base == "required" and not config.base_model:
        raise config.error("merge_method", f"{strategy.name} needs a base_model to take task vectors from; "
                                           f"add `base_model: <path or Hub name>`")
    notices: list[str] = []
    cache: dict[Path, Model] = {}
    base = _open(config.base_model, "base_model", options, cache, notices) if config.base_model else None
    models, entries = [], []
    for entry in config.models:
        m = _open(entry.reference, entry.path, options, cache, notices)
        if base is not None and strategy.base == "required" and m is base:
            notices.append(f"{entry.path} is the base model; it is left out of the merge (its task vector is zero)")
            continue
        models.append(m)
        entries.append(entry)
    if not models:
        raise config.error("models", "there is nothing to merge: every model is the base model; "
                                     "list the fine-tuned models under `models`")
    if config.layout_from:
        layout = _open(config.layout_from, "layout_from", options, cache, notices)
    else:
        layout = base or models[0]
    strategy_base = base if strategy.base != "unused" else None

    num_layers = layout.spec.num_layers(layout.checkpoint.config) or 1 + max(
        (r.layer for r in layout.roles.values() if r.layer is not None), default=0)
    if layout not in models and layout is not base:
        notices.append(f"{layout.label} is not one of the merged models: the output takes its layout and "
                       f"unmerged parts, and the merge of the others replaces its merged tensors")
    layout_parts = {part_of(r.role) for r in layout.roles.values()}
    for part in config.merge_parts or ():
        if part not in layout_parts:
            notices.append(f"merge_parts names {part}, but the layout model has no "
                           f"{_PART_NAMES[part]}")
    sources_of = ([strategy_base] if strategy_base else []) + models
    tensors: list[TensorPlan] = []
    unmatched: list[str] = []
    for name, info in layout.checkpoint.tensors.items():
        role = layout.roles[name]
        tp = TensorPlan(name, role.canonical, role.role, role.layer, info.shape, info.dtype, "carry",
                        carry_from=(layout, info))
        tensors.append(tp)
        part = part_of(role.role)
        merge = role.merge if config.merge_parts is None or part == "other" else part in config.merge_parts
        if not merge:
            tp.note = f"{_PART_NAMES.get(part, part)}: carried from the layout model"
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
        shapes = [info.shape] + [s.shape for _, s in sources]
        if len(set(shapes)) > 1:
            same_width = len({s[1:] for s in shapes}) == 1 and all(len(s) >= 1 for s in shapes)
            if not (role.role in VOCAB_ROLES and same_width):
                detail = ", ".join(f"{m.label} has {list(s.shape)}" for m, s in sources)
                raise MergeError(f"shape mismatch for tensor {name}: the layout model has {list(info.shape)}, "
                                 f"{detail}; merged models must have the same sizes")
            tp.rows = min(s[0] for s in shapes)
            carried = info.shape[0] - tp.rows
            tp.note = (f"vocabulary: {tp.rows} common rows merged"
                       + (f", {carried} rows only the layout model has carried from it" if carried else ""))
            if carried:
                notices.append(f"vocabulary of {name}: rows 0..{tp.rows - 1} (common to all models) merged, "
                               f"rows {tp.rows}..{info.shape[0] - 1} ({carried}) carried from the layout model")
        tp.action = "merge"
        tp.carry_from = None
        if config.out_dtype:
            tp.dtype = config.out_dtype
        if strategy_base:
            tp.base, sources = sources[0], sources[1:]
        tp.inputs = sources
        tp.params = resolve_parameters(config, strategy, entries, (name, role.canonical),
                                       _position(role, num_layers))
        merged_shape = info.shape if tp.rows is None else (tp.rows, *info.shape[1:])
        tp.context = TensorContext(name, role.canonical, role.role, role.layer, num_layers, merged_shape,
                                   models=tuple(m.label for m, _ in tp.inputs))
    if unmatched:
        notices.append(f"carry_unmatched: {len(unmatched)} tensors of the layout model that another model "
                       f"lacks were carried from the layout model (e.g. {unmatched[0]})")
    output = {t.canonical for t in tensors}
    for m in [base] + models if base else models:
        extra = [c for c in m.by_canonical if c not in output]
        if m is not layout and extra:
            parts: dict[str, int] = {}
            for c in extra:
                p = part_of(m.roles[m.by_canonical[c]].role)
                parts[p] = parts.get(p, 0) + 1
            detail = ", ".join(f"{_PART_NAMES.get(p, p)}: {n}" for p, n in parts.items())
            notices.append(f"{m.label} has {len(extra)} tensors the layout model does not have "
                           f"({detail}; e.g. {sorted(extra)[0]}); the output follows the layout model")
    return Plan(config, strategy, base, models, entries, layout, tensors, notices, options)


# -- reading the plan ------------------------------------------------------------------------

def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        if len(set(map(repr, value))) == 1 and value:
            return _short(value[0])
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def describe(plan: Plan) -> dict[str, Any]:
    """The plan as plain data (``fusion plan --json``)."""
    def src(pair):
        return None if pair is None else {"model": pair[0].label, "tensor": pair[1].name,
                                          "dtype": pair[1].dtype, "shape": list(pair[1].shape)}

    return {
        "merge_method": plan.strategy.name,
        "base_model": plan.base.label if plan.base else None,
        "models": [m.label for m in plan.models],
        "layout": plan.layout.label,
        "architectures": {m.label: m.spec.name for m in plan.inputs},
        "download_bytes": {m.label: m.checkpoint.download_bytes for m in plan.inputs},
        "notices": plan.notices,
        "parts": parts_summary(plan),
        "tensors": [{
            "name": t.name, "canonical": t.canonical, "role": t.role, "part": part_of(t.role), "layer": t.layer,
            "shape": list(t.shape), "dtype": t.dtype, "action": t.action, "note": t.note,
            "base": src(t.base), "inputs": [src(s) for s in t.inputs], "carry_from": src(t.carry_from),
            "params": t.params, "rows": t.rows,
        } for t in plan.tensors],
    }


def parts_summary(plan: Plan) -> dict[str, dict[str, Any]]:
    """Per part of the output (language model, vision tower, projector, other): tensor counts,
    merged and carried, and the models carried tensors come from."""
    out: dict[str, dict[str, Any]] = {}
    for t in plan.tensors:
        entry = out.setdefault(part_of(t.role), {"tensors": 0, "merged": 0, "carried": 0, "carried_from": []})
        entry["tensors"] += 1
        if t.action == "merge":
            entry["merged"] += 1
        else:
            entry["carried"] += 1
            if t.carry_from[0].label not in entry["carried_from"]:
                entry["carried_from"].append(t.carry_from[0].label)
    return out


def _tensor_line(t: TensorPlan, width: int) -> str:
    shape = "×".join(map(str, t.shape)) or "scalar"
    if t.action == "merge":
        params = " ".join(f"{k}={_short(v)}" for k, v in t.params.items())
        what = f"merge  {params}"
    else:
        what = f"carry  from {t.carry_from[0].label}"
    note = f"  ({t.note})" if t.note else ""
    return f"{t.name:<{width}}  {shape:>14} {t.dtype:<4}  {what}{note}"


def render(plan: Plan) -> str:
    """The plan as text: header, one line per tensor (grouped by part for models with a vision
    tower or projector), totals."""
    lines = [f"method      {plan.strategy.name} — {plan.strategy.description}"]
    if plan.base:
        lines.append(f"base        {plan.base.label}  [{plan.base.spec.name}]")
    for m in plan.models:
        lines.append(f"model       {m.label}  [{m.spec.name}]")
    lines.append(f"layout      {plan.layout.label}  [{plan.layout.spec.name}]")
    width = max((len(t.name) for t in plan.tensors), default=10)
    parts = parts_summary(plan)
    if not parts.keys() & {"vision_tower", "projector"}:  # a text model: one list, in file order
        lines.append("")
        lines += [_tensor_line(t, width) for t in plan.tensors]
    else:
        for part in sorted(parts, key=lambda p: (PARTS + ("other",)).index(p)):
            summary = parts[part]
            merged = [t for t in plan.tensors if part_of(t.role) == part and t.action == "merge"]
            sources = sorted({m.label for t in merged for m, _ in t.merge_sources})
            what = [f"{summary['merged']} merged" + (f" from {', '.join(sources)}" if sources else ""),
                    f"{summary['carried']} carried" + (f" from {', '.join(summary['carried_from'])}"
                                                       if summary["carried_from"] else "")]
            lines.append("")
            lines.append(f"== {_PART_NAMES.get(part, part)}: {summary['tensors']} tensors, {'; '.join(what)}")
            lines += [_tensor_line(t, width) for t in plan.tensors if part_of(t.role) == part]
    merged = [t for t in plan.tensors if t.action == "merge"]
    total = sum(t.nbytes for t in plan.tensors)
    lines.append("")
    lines.append(f"{len(plan.tensors)} tensors: {len(merged)} merged, {len(plan.tensors) - len(merged)} carried; "
                 f"output {total / 1e6:,.1f} MB")
    remote = [m for m in plan.inputs if m.checkpoint.download_bytes]
    if remote:
        fetch = sum(m.checkpoint.download_bytes for m in remote)
        lines.append(f"to download: {fetch / 1e6:,.1f} MB for {len(remote)} Hub model(s) not in the cache "
                     f"(planned from their remote headers): "
                     + ", ".join(f"{m.label} {m.checkpoint.download_bytes / 1e6:,.1f} MB" for m in remote))
    for n in plan.notices:
        lines.append(f"note: {n}")
    return "\n".join(lines)
