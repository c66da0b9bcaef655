"""Reading a plan: the text ``fusion plan`` prints and the data ``fusion plan --json`` gives."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .api.architecture import PART_NAMES, PARTS, part_of

if TYPE_CHECKING:  # the planner renders plans through this module, so it is imported late
    from .planner import Plan, TensorPlan


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
        "random_seed": plan.random_seed,
        "architectures": {m.label: m.spec.name for m in plan.inputs},
        "download_bytes": {m.label: m.checkpoint.download_bytes for m in plan.inputs},
        "notices": plan.notices,
        "layers": plan.layers.describe() if plan.layers else [],
        "parts": parts_summary(plan),
        "tensors": [{
            "name": t.name, "canonical": t.canonical, "role": t.role, "part": part_of(t.role), "layer": t.layer,
            "shape": list(t.shape), "dtype": t.dtype, "action": t.action, "note": t.note,
            "base": src(t.base), "inputs": [src(s) for s in t.inputs], "carry_from": src(t.carry_from),
            "params": t.params, "rows": t.rows, "vocabulary": t.vocab is not None,
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


def _span(a: int, b: int) -> str:
    return f"{a}" if a == b else f"{a}-{b}"


def layer_lines(plan: Plan) -> list[str]:
    """Per output slice, the output layers and the input layers each source gives them."""
    lines = [f"layers      {plan.layers.num_layers} output layers:"]
    for run in plan.layers.describe():
        out = _span(*run["output"])
        sources = " + ".join(f"{s['model']} {_span(*s['layers'])}" + (" (base)" if s["base"] else "")
                             for s in run["sources"])
        lines.append(f"            {out:>7} <- {sources}   [{run['slice']}]")
    return lines


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
    if plan.random_seed is not None:
        lines.append(f"seed        {plan.random_seed}")
    if plan.layers is not None and not plan.layers.identity:
        lines += layer_lines(plan)
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
            lines.append(f"== {PART_NAMES.get(part, part)}: {summary['tensors']} tensors, {'; '.join(what)}")
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
