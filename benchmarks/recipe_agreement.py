"""Published recipes through fusion and mergekit: does each tool merge each recipe as published,
and how far apart are the outputs (`compare_mergekit.py --recipes DIR` runs this).

Every recipe of DIR (files with the header of tests/recipes/) is run against the tiny
stand-ins of tests/recipe_models.py, first as published by both tools, then, for the agreement,
with `dtype: float32` and `out_dtype: float32`, so that mergekit computes in float32 as fusion
always does. Tensors are compared in float32; embedding and lm_head rows are matched by token
when the two tokenizers order their tokens differently. A differing tensor is put down to one
of fusion's documented differences (docs/strategies.md) when it is one:

- `random`: DARE/DELLA draw their masks from fusion's counter-based generator, mergekit from
  torch's global one: the same distribution, other draws;
- `top-k ties`: the entries that differ sit where equal keys straddle the k-th largest (TIES,
  breadcrumbs, SCE's variance), which fusion breaks by index;
- `sce weights`: mergekit's SCE used uniform weights (the summed mean squares of the selected
  deltas below 1e-6);
- `sampled quartiles`: arcee_fusion's threshold, which mergekit takes from a random sample of 10⁶
  importances in a tensor of more than 10⁶ elements (fusion's quartiles are exact);
- `float32 divergences`: arcee_fusion's kept entries, where mergekit's float32 row divergences
  (rounding noise for rows whose softmaxes nearly agree) put other entries past the threshold than
  fusion's float64 ones: the differing entries are exactly those where the two masks differ;
- `rounding`: within 1e-5 of the tensor's scale (float32 summation order).
Anything else is `unexplained` and printed as such.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from recipe_models import load_recipe, localized  # noqa: E402

RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
TOPK = {"ties", "breadcrumbs", "breadcrumbs_ties", "sce"}


def run_fusion(config: Path, out: Path) -> str | None:
    """Merge with fusion in this process; None on success, else the first line of its error."""
    import fusion

    shutil.rmtree(out, ignore_errors=True)
    try:
        fusion.merge(config, out, card=False, random_seed=42)
    except fusion.FusionError as exc:
        return str(exc).splitlines()[0]
    return None


def run_mergekit(mergekit: str, config: Path, out: Path) -> tuple[str | None, float]:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run([mergekit, str(config), str(out), "--no-write-model-card", "--quiet",
                           "--random-seed", "42"], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode:  # the exception's own line, else the last one
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)]
        return ((errors or lines or [f"exit code {proc.returncode}"])[-1])[:300], seconds
    return None, seconds


def float32_text(text: str) -> str:
    import yaml

    data = yaml.safe_load(text)
    data["dtype"] = "float32"
    data["out_dtype"] = "float32"
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _vocab(folder: Path) -> dict[str, int] | None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)


def _kth_largest(key, k: int):
    import torch

    return torch.kthvalue(key, key.numel() - k + 1).values


def _boundary(method: str, deltas: list, params: dict):
    """Positions whose selection is decided by a tie (or, for SCE's float variances, a near tie)
    at a cut of the method's top-k (None: the method selects nothing here)."""
    import math

    import torch

    from fusion.api.selection import topk_count

    shape = deltas[0].shape
    out = torch.zeros(shape, dtype=torch.bool).reshape(-1)
    if method == "sce":
        tau = params.get("select_topk", 1.0)
        if tau >= 1:
            return None
        v = torch.var(torch.stack(deltas), dim=0, unbiased=False).reshape(-1)
        k = topk_count(tau, int(torch.count_nonzero(v)))
        if 0 < k < v.numel():
            out |= (v - _kth_largest(v, k)).abs() <= 1e-5 * _kth_largest(v, k)
        return out.reshape(shape)
    for i, d in enumerate(deltas):
        key = d.abs().reshape(-1)
        n, density = key.numel(), params["density"][i]
        if density >= 1:
            continue
        if method.startswith("breadcrumbs"):  # kept: sorted positions [bottom, bottom + target)
            target, top = math.floor(density * n), math.floor(params["gamma"][i] * n)
            bottom = max(0, n - target - top)
            ordered = key.sort().values
            cuts = [j for j in (bottom - 1, bottom, bottom + target - 1, bottom + target) if 0 <= j < n]
            for j in cuts:
                out |= key == ordered[j]
        else:
            k = max(1, topk_count(density, n))
            if k < n:
                out |= (key == _kth_largest(key, k)) | (key == _kth_largest(key, k + 1))
    return out.reshape(shape)


def _arcee_masks_differ(base, other):
    """Where arcee_fusion's keep mask from float32 divergences (mergekit's, in the inputs' dtype,
    log(p/q) directly) differs from fusion's float64 one."""
    from fusion.plugins.arcee_fusion import importance, quantile_positions

    def mask(scores):
        ranked = scores.reshape(-1).sort().values
        q1, median, q3 = (ranked[k] for k in quantile_positions(ranked.numel()))
        return scores >= median + 1.5 * (q3 - q1)

    rows = other.reshape(-1, other.shape[-1]) if other.dim() > 1 else other.reshape(1, -1)
    p = rows.softmax(-1) + 1e-8
    q = base.reshape(rows.shape).softmax(-1) + 1e-8
    theirs = (rows - base.reshape(rows.shape)).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    return mask(theirs.reshape(other.shape)) != mask(importance(base, other.clone()))


def _sce_fallback(deltas: list, params: dict) -> bool:
    """Whether mergekit's SCE used uniform weights: the summed mean squares of the selected deltas
    (the top-k by variance) are below 1e-6."""
    import torch

    from fusion.api.selection import topk_count, topk_mask

    stacked = torch.stack(deltas)
    if params.get("select_topk", 1.0) < 1:
        v = torch.var(stacked, dim=0, unbiased=False)
        stacked = stacked * topk_mask(v, topk_count(params["select_topk"], int(torch.count_nonzero(v))))
    return float(stacked.square().reshape(len(deltas), -1).mean(dim=1).sum()) < 1e-6


def _inputs(tp) -> list:
    """The float32 tensors the strategy was given for ``tp`` (base first), rows gathered as the
    output vocabulary asks."""
    import torch

    views = [model.checkpoint.read(info.name) for model, info in tp.merge_sources]
    if tp.vocab is not None:
        return tp.vocab.gather(views, slice(0, tp.shape[0]))
    return [v[:tp.rows].to(torch.float32) for v in views]  # rows None: the whole tensor


def _cause(method: str, tp, far) -> str:
    """The documented cause of the differing entries ``far`` of tensor ``tp``, or 'unexplained'."""
    if method in RANDOM:
        return "random"
    if method == "arcee_fusion":
        if far.numel() > 10**6:
            return "sampled quartiles"
        return "float32 divergences" if not bool((far & ~_arcee_masks_differ(*_inputs(tp))).any()) else "unexplained"
    if method not in TOPK or tp.base is None:
        return "unexplained"
    inputs = _inputs(tp)
    deltas = [x - inputs[0] for x in inputs[1:]]
    if method == "sce" and _sce_fallback(deltas, tp.params):
        return "sce weights"
    edge = _boundary(method, deltas, tp.params)
    if edge is None or tp.rows is not None and edge.shape != far.shape:
        return "unexplained"
    if not bool((far & ~edge).any()):
        return "top-k ties"
    if method == "sce" and bool((far & edge).any()):
        return "top-k ties"  # another selection also moves SCE's model weights, so the whole tensor
    return "unexplained"


def compare(plan, ours: Path, theirs: Path) -> dict:
    """Tensor-by-tensor agreement of two float32 outputs of ``plan``'s merge, each difference put
    down to a cause."""
    import torch

    a_all, b_all = _tensors(ours), _tensors(theirs)
    va, vb = _vocab(ours), _vocab(theirs)
    counts = {"same": 0, "rounding": 0}
    causes: dict[str, int] = {}
    worst = 0.0
    planned = {t.name: t for t in plan.tensors}
    method = plan.strategy.name
    for name, a in a_all.items():
        b = b_all.get(name)
        if b is None:
            causes["missing in mergekit"] = causes.get("missing in mergekit", 0) + 1
            continue
        a, b = a.float(), b.float()
        if va and vb and va != vb and name.endswith(("embed_tokens.weight", "lm_head.weight")):
            if set(va) != set(vb):
                causes["vocabularies differ"] = causes.get("vocabularies differ", 0) + 1
                continue
            order = sorted(va, key=va.get)  # mergekit's rows in fusion's token order
            b = torch.cat([b[torch.tensor([vb[t] for t in order])], b[len(order):]])
        if a.shape != b.shape:
            causes["shape differs"] = causes.get("shape differs", 0) + 1
            continue
        if bool((a == b).all()):
            counts["same"] += 1
            continue
        scale = max(float(a.abs().max()), float(b.abs().max()), 1e-30)
        far = (a - b).abs() > 1e-5 * scale
        if not bool(far.any()):
            counts["rounding"] += 1
            continue
        worst = max(worst, float((a - b).abs().max()) / scale)
        tp = planned.get(name)
        cause = _cause(method, tp, far) if tp is not None and tp.action == "merge" else "unexplained"
        causes[cause] = causes.get(cause, 0) + 1
    extra = len(set(b_all) - set(a_all))
    if extra:
        causes["missing in fusion"] = extra
    return {"tensors": len(a_all), **counts, "causes": causes, "worst": worst}


def run(recipes_dir: Path, mergekit: str, work: Path, standins: Path, only: list[str] | None = None,
        json_path: Path | None = None) -> list[dict]:
    rows = []
    files = sorted(recipes_dir.glob("*.yaml"))
    for path in files:
        recipe = load_recipe(path)
        if only and not any(recipe.name.startswith(o) for o in only):
            continue
        row = {"recipe": recipe.name, "method": recipe.data.get("merge_method", "?")}
        text = localized(recipe, standins)
        cfg = work / f"{recipe.name}.yaml"
        cfg.write_text(text)
        row["fusion"] = run_fusion(cfg, work / "fusion-published")
        row["mergekit"], row["mergekit_s"] = run_mergekit(mergekit, cfg, work / "mergekit-published")
        if row["fusion"] is None and row["mergekit"] is None:
            cfg32 = work / f"{recipe.name}-f32.yaml"
            cfg32.write_text(float32_text(text))
            f_err = run_fusion(cfg32, work / "fusion-f32")
            m_err, _ = run_mergekit(mergekit, cfg32, work / "mergekit-f32")
            if f_err is None and m_err is None:
                import fusion

                with fusion.plan(cfg32, random_seed=42) as plan:
                    row["agreement"] = compare(plan, work / "fusion-f32", work / "mergekit-f32")
            else:
                row["agreement_error"] = f_err or m_err
        rows.append(row)
        print(_line(row), flush=True)
    print()
    print(table(rows))
    if json_path:
        json_path.write_text(json.dumps(rows, indent=2))
    return rows


def _verdict(error: str | None) -> str:
    return "merged" if error is None else "refused"


def _line(row: dict) -> str:
    agree = row.get("agreement")
    detail = (f"{agree['same']}+{agree['rounding']}/{agree['tensors']} agree; {agree['causes']}" if agree
              else row.get("agreement_error") or "")
    return (f"{row['recipe']:<48} fusion {_verdict(row['fusion']):<8} mergekit {_verdict(row['mergekit']):<8} "
            f"{detail}" + (f"\n    fusion: {row['fusion']}" if row["fusion"] else "")
            + (f"\n    mergekit: {row['mergekit']}" if row["mergekit"] else ""))


def table(rows: list[dict]) -> str:
    lines = ["| recipe | method | fusion | mergekit | tensors same / within rounding / differ | "
             "differences put down to | worst relative difference |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r.get("agreement")
        if a:
            differ = a["tensors"] - a["same"] - a["rounding"]
            agree = f"{a['same']} / {a['rounding']} / {differ}"
            causes = ", ".join(f"{k}: {v}" for k, v in a["causes"].items()) or "–"
            worst = f"{a['worst']:.2e}" if a["worst"] else "–"
        else:
            agree, causes, worst = "–", r.get("agreement_error") or "–", "–"
        lines.append(f"| {r['recipe']} | {r['method']} | {_verdict(r['fusion'])} | {_verdict(r['mergekit'])} | "
                     f"{agree} | {causes} | {worst} |")
    merged = sum(r["fusion"] is None for r in rows), sum(r["mergekit"] is None for r in rows)
    lines.append("")
    lines.append(f"{len(rows)} recipes: fusion merged {merged[0]}, mergekit merged {merged[1]}")
    return "\n".join(lines)
