"""What a fuse run tells its user: report.json, a readable summary, a loss plot, model cards."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:5.1f}%" if whole else "    -"


def _loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def summary(report: dict[str, Any]) -> str:
    lines = [f"fusion fuse: pivot {report['pivot']['reference']}, {len(report['sources'])} source(s), "
             f"{report['data']['train']} training / {report['data']['heldout']} held-out sequences"]
    lines.append("")
    lines.append("stage        seconds")
    for name, stage in report["stages"].items():
        note = stage.get("note", "")
        lines.append(f"  {name:<10} {stage['seconds']:8.2f}  {note}".rstrip())
    if report.get("alignment"):
        lines += ["", "alignment of response positions (exact / mapped / fallback) and of source top-k tokens "
                      "(exact / mapped / dropped)"]
        for name, cov in report["alignment"].items():
            p, t = cov["positions"], cov["topk_tokens"]
            n, m = sum(p.values()), sum(t.values())
            lines.append(f"  {name:<24} positions {_pct(p['exact'], n)} {_pct(p['mapped'], n)} "
                         f"{_pct(p['fallback'], n)} of {n}   tokens {_pct(t['exact'], m)} {_pct(t['mapped'], m)} "
                         f"{_pct(t['dropped'], m)} of {m}")
    if report.get("fusion"):
        fn = report["fusion_function"]
        lines += ["", f"fusion function {fn}: sequences where each side weighs more (pivot / source), "
                      f"mean source weight"]
        for name, f in report["fusion"].items():
            lines.append(f"  {name:<24} {f['pivot_chosen']} / {f['source_chosen']}   {f['source_weight_mean']:.3f}")
    if report.get("training"):
        lines += ["", "training loss (first → last optimizer step)"]
        for name, t in report["training"].items():
            if t["curve"]:
                c = t["curve"]
                lines.append(f"  {name:<24} {c[0]['loss']:.4f} → {c[-1]['loss']:.4f} over {len(c)} steps"
                             + ("  (reused)" if t.get("reused") else ""))
    held = report.get("heldout_loss")
    if held:
        lines += ["", "held-out loss (mean CE on response tokens)", f"  {'pivot':<40} {_loss(held.get('pivot'))}"]
        for name, value in (held.get("targets") or {}).items():
            lines.append(f"  {'target ' + name:<40} {_loss(value)}")
        if "merged" in held:
            lines.append(f"  {'merged':<40} {_loss(held['merged'])}")
    lines += [""] + [f"note: {n}" for n in report.get("notes", [])]
    lines.append(f"wrote {report['output']}: " + ", ".join(report["outputs"]))
    return "\n".join(line.rstrip() for line in lines).replace("\n\n\n", "\n\n")


def plot(report: dict[str, Any], path: Path) -> bool:
    """A PNG of the training loss curves (total, gold and distillation terms); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, t in report.get("training", {}).items():
        c = t["curve"]
        if not c:
            continue
        steps = [e["step"] for e in c]
        line, = ax.plot(steps, [e["loss"] for e in c], label=f"{name} loss")
        ax.plot(steps, [e["lm_loss"] for e in c], ":", color=line.get_color(), label=f"{name} gold CE")
        ax.plot(steps, [e["distill_loss"] for e in c], "--", color=line.get_color(), label=f"{name} fused CE")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("pairwise fusion: training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def write_report(report: dict[str, Any], output: Path) -> str:
    text = summary(report)
    _write(output / "report.json", json.dumps(report, indent=2) + "\n")
    _write(output / "report.md", "# Pairwise fusion report\n\n```\n" + text + "\n```\n")
    return text


def target_card(pivot: str, source: str, config_text: str, training: dict, alignment: str,
                function: str) -> str:
    front = {"base_model": [pivot], "library_name": "transformers", "tags": ["fusion", "knowledge-fusion"]}
    return "\n".join([
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        "# Fused target model", "",
        f"A copy of `{pivot}` trained by fusion's pairwise knowledge fusion "
        f"([FuseChat](https://arxiv.org/abs/2408.07990)) to absorb `{source}`: both models scored the "
        f"fusion data; the source's top-k next-token distributions were aligned to the pivot's tokens "
        f"(`{alignment}` vocabulary map) and fused with the pivot's own by `{function}`; the pivot was then "
        f"trained on L = λ·CE(gold) + (1−λ)·CE(fused) with λ = {training['lm_loss_weight']} for "
        f"{training['epochs']} epoch(s), learning rate {training['learning_rate']}.", "",
        "## Configuration", "", "```yaml", config_text.rstrip(), "```", "",
    ])


def merged_note(targets: list[str]) -> str:
    return "\n".join([
        "", "## How the inputs were made", "",
        "The merged models are the targets of fusion's pairwise knowledge fusion "
        "([FuseChat](https://arxiv.org/abs/2408.07990)), each a copy of the pivot distilled from one source:",
        "", *[f"- `{t}`" for t in targets], "",
        "`report.json` beside this folder holds the alignment coverage, losses and timings.", "",
    ])
