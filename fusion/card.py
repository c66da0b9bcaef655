"""What a merged model says about itself: the model card (README.md) and fusion.json."""

from __future__ import annotations

from typing import Any

import yaml

from .planner import Plan


def model_card(plan: Plan, resolved: dict) -> str:
    refs: list[str] = []
    for m in ([plan.base] if plan.base else []) + plan.models + [plan.layout]:
        if m.reference not in refs:
            refs.append(m.reference)
    # the Hub's base_model field takes repository ids; local folders are named in the text below
    hub = [r.split("@", 1)[0] for r in refs if r in resolved]
    front = {
        "base_model": hub or refs,
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["merge", "fusion"],
    }
    s = plan.strategy
    method = f"[{s.name}]({s.paper})" if s.paper else s.name
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {plan.config.name or 'Merged model'}",
        "",
        f"This model was made with fusion by merging the models below with {method}: {s.description}",
        "",
        "## Models",
        "",
    ]
    if plan.base:
        lines.append(f"- base: `{plan.base.reference}`{_pin(plan.base.reference, resolved)}")
    for m in plan.models:
        lines.append(f"- `{m.reference}`{_pin(m.reference, resolved)}")
    if plan.layout not in plan.models and plan.layout is not plan.base:
        lines.append(f"- layout, config and tokenizer: `{plan.layout.reference}`{_pin(plan.layout.reference, resolved)}")
    merged = sum(t.action == "merge" for t in plan.tensors)
    lines += [
        "",
        f"{merged} of {len(plan.tensors)} tensors were merged; the others were carried over unchanged "
        f"from `{plan.layout.reference}`."
        + (f" Random seed: {plan.random_seed}." if plan.random_seed is not None else ""),
        "",
        "## Configuration",
        "",
        "```yaml",
        plan.config.text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _pin(reference: str, resolved: dict) -> str:
    info = resolved.get(reference)
    return f" (commit `{info['commit']}`)" if isinstance(info, dict) and info.get("commit") else ""


def provenance(plan: Plan) -> dict[str, Any]:
    """Machine-readable record of what was merged, for reproducing the merge exactly."""
    from .version import __version__

    resolved = plan.resolve_options.resolved
    return {
        "fusion_version": __version__,
        "name": plan.config.name,
        "merge_method": plan.strategy.name,
        "random_seed": plan.random_seed,
        "inputs": [{
            "label": m.label, "reference": m.reference, "path": str(m.folder),
            "architecture": m.spec.name, "revision": resolved.get(m.reference),
        } for m in plan.inputs],
        "config": plan.config.text,
    }
