"""fusion against mergekit on the same configs: per-tensor agreement and speed.

Runs `fusion merge` and `mergekit-yaml` (installed in any environment: pass its path) on the same
mergekit-style configs over a synthetic bf16 set (benchmarks/modelsets.py: base + 3 fine-tunes),
each in a fresh process, and reports wall time, peak RSS and, tensor by tensor, how far apart
the two outputs are. mergekit runs twice per config: with its default (the math in the inputs'
dtype, bf16 here) and with `dtype: float32` (the math in float32, as fusion always does).

    .venv/bin/python benchmarks/compare_mergekit.py --mergekit /path/to/venv/bin/mergekit-yaml \
        [--shape tiny|qwen2-0.5b] [--sets /tmp/fusion-sets] [--methods ties sce ...] [--repeats 1]
    .venv/bin/python benchmarks/compare_mergekit.py --mergekit ... --recipes tests/recipes [--only 01 17]

With `--recipes DIR`, it runs published recipes instead (benchmarks/recipe_agreement.py).

Agreement classes for a tensor (both outputs bf16): `same` (every bit), `≤1 ulp` (every element
within one bf16 ulp of the larger magnitude), else `differs`; the share of all elements more
than one ulp apart; and, against mergekit in float32, the share of those that sit where the
selection is decided by a tie (TIES: |δ| equal to the k-th largest; SCE: a variance within 1e-5
of the k-th), where the two tools legitimately keep different entries (for SCE, with the rest of
that tensor, since the selection also sets the model weights ηᵢ), and of those in tensors
where mergekit's SCE replaced the model weights by uniform ones (summed mean squared deltas
below 1e-6; fusion keeps the real weights: a deliberate difference), and of those where the
result nearly cancels (|θ₀ + Δ| tiny against |θ₀| and |δᵢ|: the difference is within 1e-4 of
the operands, float32 rounding order decides, and a tiny number's ulp is tiny).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from modelsets import make_set  # noqa: E402

# Run a console script in this process and report its own peak RSS (VmHWM) on stderr.
WRAPPER = """
import runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
finally:
    hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    print("PEAK_KB", hwm, file=sys.stderr)
sys.exit(code)
"""

METHODS = {
    "linear": ("linear", None, {"weight": [0.2, 0.3, 0.5]}, {}),
    "task_arithmetic": ("task_arithmetic", "base", {"weight": [0.5, 0.3, 0.2]}, {"lambda": 1.0}),
    "ties": ("ties", "base", {"weight": [1.0, 0.7, 0.5], "density": [0.5, 0.5, 0.5]}, {}),
    "sce": ("sce", "base", {}, {"select_topk": 0.1}),
}


def config_text(method: str, paths: dict[str, Path], float32: bool) -> str:
    name, base, per_model, shared = METHODS[method]
    lines = [f"merge_method: {name}"]
    if base:
        lines.append(f"base_model: {paths['base']}")
    lines.append("models:")
    for i, key in enumerate(k for k in paths if k != "base"):
        lines.append(f"  - model: {paths[key]}")
        if per_model:
            params = ", ".join(f"{p}: {v[i]}" for p, v in per_model.items())
            lines.append(f"    parameters: {{{params}}}")
    if shared:
        lines.append("parameters: {" + ", ".join(f"{k}: {v}" for k, v in shared.items()) + "}")
    if float32:
        lines.append("dtype: float32")
    lines.append("out_dtype: bfloat16")
    return "\n".join(lines) + "\n"


def run(python: str, script: str, args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one run of a console script in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.run([python, "-c", WRAPPER, script, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{Path(script).name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_KB")]
    return seconds, int(peak[-1].split()[1]) / 1024


class Folder:
    """Lazy tensor access to a model folder (sharded or not)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.files = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            handle = safe_open(str(f), framework="pt")
            for name in handle.keys():
                self.files[name] = handle

    def __getitem__(self, name: str):
        return self.files[name].get_tensor(name)

    def __contains__(self, name: str) -> bool:
        return name in self.files


def far_from(a, b):
    """Positions where bf16 values a and b are more than one ulp apart, the ulp taken at the
    larger magnitude of the two (a bare ulp count blows up near zero, where a 1e-9 difference
    is thousands of ulps of a tiny number)."""
    import torch

    a, b = a.float(), b.float()
    _, exponent = torch.frexp(torch.maximum(a.abs(), b.abs()))
    ulp = torch.ldexp(torch.ones_like(a), (exponent - 8).clamp(min=-133))  # bf16: 8 significant bits
    return (a - b).abs() > ulp


def boundary(method: str, base, deltas: list, params: dict):
    """Positions where the method's selection is decided by a tie or a near-tie at the k-th key:
    there, two correct implementations may keep different entries (ties: which of equal |δ|;
    sce: variances that differ in their last bits between float64 and float32 computations)."""
    import torch

    from fusion.api.selection import topk_count

    if method == "ties":
        out = torch.zeros(base.shape, dtype=torch.bool)
        for d, density in zip(deltas, params["density"]):
            key = d.abs().reshape(-1)
            k = topk_count(density, key.numel())
            if 0 < k < key.numel():
                t = torch.kthvalue(key, key.numel() - k + 1).values
                out |= (key == t).reshape(base.shape)
        return out
    if method == "sce":
        v = torch.var(torch.stack(deltas), dim=0, unbiased=False).reshape(-1)
        k = topk_count(params["select_topk"], int(torch.count_nonzero(v)))
        if not 0 < k < v.numel():
            return torch.zeros(base.shape, dtype=torch.bool)
        t = torch.kthvalue(v, v.numel() - k + 1).values
        return ((v - t).abs() <= 1e-5 * t).reshape(base.shape)
    return None


def uniform_fallback(method: str, deltas: list, params: dict) -> bool:
    """Whether mergekit's SCE replaced the model weights by uniform ones for this tensor: it does
    when the summed mean squared (selected) deltas are below 1e-6, which small real deltas are."""
    import torch

    from fusion.api.selection import topk_count, topk_mask

    if method != "sce":
        return False
    deltas = torch.stack(deltas)
    v = torch.var(deltas, dim=0, unbiased=False)
    k = topk_count(params["select_topk"], int(torch.count_nonzero(v)))
    selected = deltas * topk_mask(v, k)
    return float(selected.square().reshape(len(deltas), -1).mean(dim=1).sum()) < 1e-6


def agreement(method: str, ours: Folder, theirs: Folder, inputs: dict, params: dict) -> dict:
    """Per-tensor agreement; differing positions are checked against the selection boundary."""
    import torch

    counts = {"same": 0, "≤1 ulp": 0, "differs": 0, "missing": 0}
    worst: list[tuple[float, str]] = []
    elements = far = explained = fallback = cancelled = 0
    for name in ours.files:
        if name not in theirs:
            counts["missing"] += 1
            continue
        a, b = ours[name], theirs[name].to(ours[name].dtype)
        if a.shape != b.shape:
            counts["missing"] += 1
            continue
        elements += a.numel()
        if a.numel() == 0 or bool((a.view(-1) == b.view(-1)).all()) and bool((a.view(-1).signbit() == b.view(-1).signbit()).all()):
            counts["same"] += 1
            continue
        mask = far_from(a, b)
        n_far = int(mask.sum())
        if n_far == 0:
            counts["≤1 ulp"] += 1
            continue
        counts["differs"] += 1
        far += n_far
        worst.append((n_far / a.numel(), name))
        base = inputs["base"][name].float()
        deltas = [inputs[k][name].float() - base for k in inputs if k != "base"]
        if uniform_fallback(method, deltas, params):
            fallback += n_far
            continue
        edge = boundary(method, base, deltas, params)
        if edge is not None:
            at_edge = int((mask & edge).sum())
            explained += at_edge
            mask &= ~edge
            if method == "sce" and at_edge:
                # a different selection also moves the model weights ηᵢ (sums over the selected
                # entries), which shifts every merged entry of this tensor a little
                explained += int(mask.sum())
                continue
        # What is left: results that (nearly) cancel, θ₀ + Δ ≈ 0, where float32 rounding of the
        # operands decides the small remainder and a tiny absolute difference is many ulps.
        scale = base.abs()
        for d in deltas:
            scale = torch.maximum(scale, d.abs())
        cancelled += int((mask & ((a.float() - b.float()).abs() <= 1e-4 * scale)).sum())
    counts["extra in mergekit"] = len(set(theirs.files) - set(ours.files))
    worst.sort(reverse=True)
    return {"tensors": counts, "elements_far": far / max(elements, 1),
            "far_at_boundary": explained / far if far else None,
            "far_in_fallback": fallback / far if far else None,
            "far_cancelling": cancelled / far if far else None,
            "far_unexplained": (far - explained - fallback - cancelled) / far if far else None,
            "worst": worst[:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit", required=True, help="path of the mergekit-yaml console script")
    ap.add_argument("--fusion", default=shutil.which("fusion") or str(Path(sys.executable).parent / "fusion"))
    ap.add_argument("--shape", default="tiny", choices=["tiny", "qwen2-0.5b", "qwen2.5-7b"])
    ap.add_argument("--sets", type=Path, default=Path(tempfile.gettempdir()) / "fusion-sets")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--fusion-args", default="", help="extra arguments for fusion merge, e.g. '--kernel torch'")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--recipes", type=Path, metavar="DIR",
                    help="instead: run the published recipes in DIR (e.g. tests/recipes) on tiny stand-ins and "
                         "report, per recipe, whether each tool merges it and how far apart the outputs are")
    ap.add_argument("--only", nargs="+", metavar="PREFIX", help="with --recipes: only the recipes named so")
    args = ap.parse_args()
    if args.recipes:
        from recipe_agreement import run as run_recipes

        args.sets.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.sets) as tmp:
            run_recipes(args.recipes, args.mergekit, Path(tmp), args.sets / "recipe-standins", args.only, args.json)
        return

    mk_python = Path(args.mergekit).read_text().splitlines()[0].removeprefix("#!").strip()
    paths = make_set(args.shape, args.sets / args.shape)
    size = sum(f.stat().st_size for p in paths.values() for f in p.glob("*.safetensors"))
    print(f"set {args.shape}: {len(paths)} bf16 models, {size / 1e9:.2f} GB in all ({args.sets / args.shape})")
    results = []
    with tempfile.TemporaryDirectory(dir=args.sets) as tmp:
        work = Path(tmp)
        for method in args.methods:
            outs, times = {}, {}
            for tool, float32 in (("fusion", False), ("mergekit", False), ("mergekit", True)):
                label = f"{tool}{' fp32' if float32 else ''}"
                cfg = work / f"{method}-{label.replace(' ', '-')}.yaml"
                cfg.write_text(config_text(method, paths, float32))
                out = work / f"out-{method}-{label.replace(' ', '-')}"
                runs = []
                for _ in range(args.repeats):
                    shutil.rmtree(out, ignore_errors=True)
                    if tool == "fusion":
                        cmd = ["merge", str(cfg), "-o", str(out), "--quiet", *args.fusion_args.split()]
                        runs.append(run(sys.executable, args.fusion, cmd))
                    else:
                        runs.append(run(mk_python, args.mergekit, [str(cfg), str(out)]))
                times[label] = (statistics.median(r[0] for r in runs), max(r[1] for r in runs))
                outs[label] = out
                print(f"  {method:<16} {label:<14} {times[label][0]:7.2f} s  {times[label][1]:7.0f} MB", flush=True)
            ours = Folder(outs["fusion"])
            inputs = {k: Folder(p) for k, p in paths.items()}
            params = {**METHODS[method][2], **METHODS[method][3]}
            row = {"method": method, "times": times}
            for label in ("mergekit", "mergekit fp32"):
                row[label] = agreement(method, ours, Folder(outs[label]), inputs, params)
            results.append(row)
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)

    print()
    print("| method | fusion s | mergekit s | mergekit fp32 s | speed-up | fusion MB | mergekit MB "
          "| vs mergekit: same / ≤1 ulp / differs | elements >1 ulp | vs mergekit fp32: same / ≤1 ulp / differs "
          "| elements >1 ulp | of which: at a selection tie / uniform-weight fallback / cancelling / other |")
    print("|" + "---|" * 12)
    for r in results:
        t = r["times"]
        cells = [r["method"], f"{t['fusion'][0]:.2f}", f"{t['mergekit'][0]:.2f}", f"{t['mergekit fp32'][0]:.2f}",
                 f"{t['mergekit'][0] / t['fusion'][0]:.1f}×", f"{t['fusion'][1]:.0f}",
                 f"{max(t['mergekit'][1], t['mergekit fp32'][1]):.0f}"]
        for label in ("mergekit", "mergekit fp32"):
            a = r[label]["tensors"]
            cells.append(f"{a['same']} / {a['≤1 ulp']} / {a['differs']}"
                         + (f" (+{a['missing']} missing)" if a["missing"] else ""))
            cells.append(f"{100 * r[label]['elements_far']:.4f}%")
        shares = [r["mergekit fp32"][key] for key in
                  ("far_at_boundary", "far_in_fallback", "far_cancelling", "far_unexplained")]
        cells.append("–" if shares[0] is None else " / ".join(f"{100 * x:.1f}%" for x in shares))
        print("| " + " | ".join(cells) + " |")
    print()
    for r in results:
        for label in ("mergekit", "mergekit fp32"):
            for share, name in r[label]["worst"]:
                print(f"{r['method']} vs {label}: {name}: {100 * share:.3f}% of elements >1 ulp apart")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
