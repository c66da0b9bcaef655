"""The layer-wise part of a merge config: ``slices`` and ``modules``, as mergekit writes them.

An output slice stacks layers: each of its sources contributes the layers of its ``layer_range``
(``[start, end)``, end exclusive; every source of a slice spans the same number of layers), the
slices follow one another, and the output's layers are numbered across them. A ``models:``
config is the one slice whose sources are the whole models; ``modules: {default: ...}`` is the
same as writing its ``slices``/``models`` and ``parameters`` at the top level, with the
module's parameters between the slices' and the top-level ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .configfile import Problems

SLICE_KEYS = ("sources", "parameters", "base_model", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
MODULE_KEYS = ("slices", "models", "parameters")
#: The one module of a model: its language model's layers (vision towers and projectors are
#: merged through ``merge_parts``).
MODULE = "default"


@dataclass
class SourceEntry:
    """One source of an output slice: a model and the layers ``[start, end)`` it contributes."""

    reference: str
    start: int
    end: int
    parameters: dict[str, Any]
    path: str  # e.g. "slices[0].sources[1]"

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class SliceEntry:
    """One output slice of a ``slices:`` config."""

    sources: list[SourceEntry]
    parameters: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None  # this slice's own base, replacing the top-level one
    path: str = ""

    @property
    def length(self) -> int:
        return self.sources[0].length if self.sources else 0


@dataclass
class Layered:
    """What ``slices`` / ``modules`` give a config: the slices (None for a ``models:`` config),
    the raw ``models`` list a module may hold instead, and the module's parameters."""

    slices: list[SliceEntry] | None = None
    models: Any = None
    models_path: str = "models"
    module_parameters: dict[str, Any] = field(default_factory=dict)
    module_path: str = ""


def _layer_range(value: Any, path: str, problems: Problems) -> tuple[int, int] | None:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        problems.add(path, f"layer_range is a pair of layer numbers [start, end) such as [0, 16], not {value!r}")
        return None
    start, end = value
    if not 0 <= start < end:
        problems.add(path, f"layer_range {value} is empty or negative; it needs 0 <= start < end "
                           f"(end is not included)")
        return None
    return start, end


def parse_slices(raw: Any, path: str, problems: Problems,
                 reference: Callable[[str, Any, bool], str | None]) -> list[SliceEntry]:
    """The slices of a ``slices:`` list at ``path``; every problem goes to ``problems``."""
    if not isinstance(raw, list) or not raw:
        problems.add(path, "slices must be a non-empty list of `- sources: [{model: ..., layer_range: [0, 16]}]`")
        return []
    slices = []
    for i, entry in enumerate(raw):
        p = f"{path}[{i}]"
        if not isinstance(entry, Mapping) or "sources" not in entry:
            problems.add(p, "each slice needs `sources:`, a list of `{model: ..., layer_range: [start, end]}`")
            continue
        problems.known_keys(entry, SLICE_KEYS, p, "a slice has")
        params = problems.mapping(entry.get("parameters"), f"{p}.parameters", "{weight: 0.5}")
        residual = entry.get("residual_weight")
        if residual is not None and (isinstance(residual, bool) or not isinstance(residual, (int, float))):
            problems.add(f"{p}.residual_weight", f"residual_weight is a number, not {residual!r}")
        elif residual is not None:
            problems.note(f"{p}.residual_weight", "residual_weight has no effect (mergekit accepts it and "
                                                  "uses it nowhere); remove it")
        raw_sources = entry["sources"]
        if not isinstance(raw_sources, list) or not raw_sources:
            problems.add(f"{p}.sources", "sources must be a non-empty list of `{model: ..., layer_range: [start, end]}`")
            continue
        sources = []
        for j, src in enumerate(raw_sources):
            q = f"{p}.sources[{j}]"
            if not isinstance(src, Mapping) or "model" not in src or "layer_range" not in src:
                problems.add(q, "each source needs `model:` (a path or Hub name) and `layer_range: [start, end]`")
                continue
            problems.known_keys(src, SOURCE_KEYS, q, "a slice source has")
            src_params = problems.mapping(src.get("parameters"), f"{q}.parameters", "{weight: 0.5}")
            ref = reference(f"{q}.model", src["model"], True)
            span = _layer_range(src["layer_range"], f"{q}.layer_range", problems)
            if ref is not None and span is not None:
                sources.append(SourceEntry(ref, span[0], span[1], dict(src_params), q))
        lengths = {s.length for s in sources}
        if len(lengths) > 1:
            detail = ", ".join(f"{s.path} has {s.length}" for s in sources)
            problems.add(f"{p}.sources", f"every source of a slice must span the same number of layers ({detail}); "
                                         f"change the layer_range values")
        refs = [s.reference for s in sources]
        if len(set(refs)) < len(refs):
            twice = next(r for r in refs if refs.count(r) > 1)
            problems.add(f"{p}.sources", f"{twice!r} is a source of this slice twice; a slice merges different "
                                         f"models (use another slice to repeat layers)")
        base = reference(f"{p}.base_model", entry.get("base_model"), False)
        if sources and len(lengths) == 1:
            slices.append(SliceEntry(sources, dict(params), base, p))
    return slices


def parse_layered(data: Mapping, problems: Problems,
                  reference: Callable[[str, Any, bool], str | None]) -> Layered:
    """``models``, ``slices`` or ``modules`` (exactly one of them) of a top-level config."""
    given = [k for k in ("models", "slices", "modules") if data.get(k) not in (None, [], {})]
    if len(given) != 1:
        what = f"it has {' and '.join(given)}" if given else "it has none"
        problems.add(given[1] if len(given) > 1 else "models",
                     f"a config lists its models under exactly one of `models`, `slices` or `modules` ({what}); "
                     f"e.g. `models: [{{model: ./my-finetune}}]`")
        return Layered(models=data.get("models") or [])
    if given[0] == "models":
        return Layered(models=data["models"])
    if given[0] == "slices":
        return Layered(slices=parse_slices(data["slices"], "slices", problems, reference))
    modules = data["modules"]
    if not isinstance(modules, Mapping):
        problems.add("modules", f"modules is a mapping such as `modules: {{{MODULE}: {{slices: [...]}}}}`")
        return Layered(models=[])
    for name in modules:
        if name != MODULE:
            problems.add(f"modules.{name}", f"unknown module {name!r}: a model is merged as the one module "
                                            f"`{MODULE}` (vision towers and projectors are merged with `merge_parts`)")
    module = modules.get(MODULE)
    p = f"modules.{MODULE}"
    if not isinstance(module, Mapping):
        if MODULE in modules:
            problems.add(p, "a module is a mapping with `slices:` or `models:` and optional `parameters:`")
        return Layered(models=[])
    problems.known_keys(module, MODULE_KEYS, p, "a module has")
    params = dict(problems.mapping(module.get("parameters"), f"{p}.parameters", "{weight: 0.5}"))
    inner = [k for k in ("slices", "models") if module.get(k) not in (None, [])]
    if len(inner) != 1:
        problems.add(p, "a module lists its models under exactly one of `slices` or `models`")
        return Layered(models=[], module_parameters=params, module_path=p)
    if inner[0] == "models":
        return Layered(models=module["models"], models_path=f"{p}.models", module_parameters=params,
                       module_path=p)
    return Layered(slices=parse_slices(module["slices"], f"{p}.slices", problems, reference),
                   module_parameters=params, module_path=p)
