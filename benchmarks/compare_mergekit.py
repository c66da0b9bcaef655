"""fusion against mergekit on the same configs: speed, memory and per-tensor agreement, for every
merge method fusion and mergekit share.

Runs `fusion merge` and `mergekit-yaml` (installed in any environment: pass its path) on one
mergekit-style config per method over a synthetic bf16 set (benchmarks/modelsets.py: a base and
three fine-tunes), each run in a fresh process:

- as users run it (bf16 in, bf16 out, mergekit computing in the inputs' dtype): wall time and
  peak RSS of both tools;
- with `dtype: float32` and `out_dtype: float32` (mergekit computing in float32, as fusion always
  does): tensor by tensor, bit-equal / within rounding (1e-5 of the tensor's scale) / different,
  every difference put down to a cause from fusion's documented differences (docs/strategies.md,
  the rules of benchmarks/recipe_agreement.py) or counted as unexplained;
- for the seeded methods (DARE, DELLA), whose masks come from different generators, statistics
  instead of bits: the share of entries the merge moves and whose sign is that of Σ wᵢδᵢ (three
  models), the kept fraction and the rescale factor (one model), and the bits again at density 1,
  where nothing is random.

    .venv/bin/python benchmarks/compare_mergekit.py --mergekit /path/to/venv/bin/mergekit-yaml \\
        [--shape tiny|qwen2-0.5b] [--sets /tmp/fusion-sets] [--methods ties slerp ...] [--json out.json]
    .venv/bin/python benchmarks/compare_mergekit.py --mergekit ... --recipes tests/recipes [--only 01 17]

With `--recipes DIR`, it runs published recipes instead (benchmarks/recipe_agreement.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from modelsets import make_set  # noqa: E402
from recipe_agreement import RANDOM, compare, float32_text  # noqa: E402

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

W3 = [0.5, 0.7, -0.4]  # a negative weight turns its model's vote in the sign-electing methods
#: method → (takes a base model, fine-tunes merged, per-model parameters, global parameters)
METHODS = {
    "linear": (False, 3, {"weight": [0.2, 0.3, 0.5]}, {}),
    "task_arithmetic": (True, 3, {"weight": W3}, {"lambda": 0.8}),
    "ties": (True, 3, {"weight": W3, "density": [0.5, 0.3, 0.6]}, {}),
    "sce": (True, 3, {}, {"select_topk": 0.1}),
    "dare_linear": (True, 3, {"weight": W3, "density": [0.5, 0.4, 0.6]}, {}),
    "dare_ties": (True, 3, {"weight": W3, "density": [0.5, 0.4, 0.6]}, {}),
    "breadcrumbs": (True, 3, {"weight": W3, "density": [0.5, 0.7, 0.4], "gamma": [0.1, 0.05, 0.01]}, {}),
    "breadcrumbs_ties": (True, 3, {"weight": W3, "density": [0.5, 0.7, 0.4]}, {"gamma": 0.1}),
    "della": (True, 3, {"weight": W3, "density": [0.5, 0.4, 0.6]}, {"epsilon": 0.1}),
    "della_linear": (True, 3, {"weight": W3, "density": [0.5, 0.4, 0.6]}, {"epsilon": 0.1}),
    "slerp": (True, 1, {}, {"t": 0.4}),
    "nuslerp": (False, 2, {"weight": [0.6, 0.4]}, {}),
    "multislerp": (False, 3, {"weight": [0.5, 0.3, 0.2]}, {}),
    "karcher": (False, 3, {}, {"max_iter": 10}),
    "model_stock": (True, 3, {}, {}),
    "nearswap": (True, 1, {}, {"t": 0.001}),
    "arcee_fusion": (True, 1, {}, {}),
    "ram": (True, 3, {}, {"epsilon": 0.001}),
    "ramplus_tl": (True, 3, {}, {"epsilon": 0.001}),
    "passthrough": (False, 1, {}, {"scale": 1.0}),
}
SEED = 42


def config_text(method: str, paths: dict[str, Path], count: int | None = None, **overrides) -> str:
    """The bf16 config of ``method`` over the set; ``count`` fine-tunes (default the method's),
    ``overrides`` replacing per-model parameters (one value for every model)."""
    takes_base, default_count, per_model, shared = METHODS[method]
    count = count or default_count
    per_model = {**per_model, **{k: [v] * count for k, v in overrides.items()}}
    lines = [f"merge_method: {method}"]
    if takes_base:
        lines.append(f"base_model: {paths['base']}")
    lines.append("models:")
    for i, key in enumerate([k for k in paths if k != "base"][:count]):
        lines.append(f"  - model: {paths[key]}")
        if per_model:
            lines.append("    parameters: {" + ", ".join(f"{p}: {v[i]}" for p, v in per_model.items()) + "}")
    if shared:
        lines.append("parameters: {" + ", ".join(f"{k}: {v}" for k, v in shared.items()) + "}")
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


class Tools:
    """Both tools' command lines, each merge in a fresh process."""

    def __init__(self, fusion: str, mergekit: str, extra: str):
        self.fusion, self.mergekit, self.extra = fusion, mergekit, extra.split()
        self.mk_python = Path(mergekit).read_text().splitlines()[0].removeprefix("#!").strip()

    def merge(self, tool: str, cfg: Path, out: Path) -> tuple[float, float]:
        shutil.rmtree(out, ignore_errors=True)
        if tool == "fusion":
            return run(sys.executable, self.fusion, ["merge", str(cfg), "-o", str(out), "--quiet",
                                                     "--random-seed", str(SEED), *self.extra])
        return run(self.mk_python, self.mergekit, [str(cfg), str(out), "--quiet", "--random-seed", str(SEED)])

    def both(self, text: str, work: Path, label: str) -> dict[str, Path]:
        cfg = work / f"{label}.yaml"
        cfg.write_text(text)
        outs = {tool: work / f"out-{label}-{tool}" for tool in ("fusion", "mergekit")}
        for tool, out in outs.items():
            self.merge(tool, cfg, out)
        return outs


def agreement(tools: Tools, text: str, work: Path, label: str) -> dict:
    """The float32 runs of ``text`` compared tensor by tensor (recipe_agreement.compare)."""
    import fusion

    text = float32_text(text)
    outs = tools.both(text, work, label)
    cfg = work / f"{label}.yaml"
    with fusion.plan(cfg, random_seed=SEED) as plan:
        return compare(plan, outs["fusion"], outs["mergekit"])


class _Lazy:
    """A model folder's tensors in float64, read one at a time (a 0.5B set does not fit in memory
    four times over in float64)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.handles = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            handle = safe_open(str(f), framework="pt")
            self.handles.update({name: handle for name in handle.keys()})

    def __getitem__(self, name: str):
        return self.handles[name].get_tensor(name).double()


def seeded_stats(tools: Tools, method: str, paths: dict[str, Path], work: Path) -> dict:
    """What the random masks do, per tool: moved share and sign agreement with Σ wᵢδᵢ (three
    models), kept fraction and rescale factor (one model, weight 1); the bits at density 1."""
    import torch

    base = _Lazy(paths["base"])
    fts = [_Lazy(paths[k]) for k in ("ft1", "ft2", "ft3")]
    weights = METHODS[method][2]["weight"]
    stats: dict = {"density 1": agreement(tools, config_text(method, paths, density=1.0), work, f"{method}-d1")}
    three = tools.both(float32_text(config_text(method, paths)), work, f"{method}-3")
    one = tools.both(float32_text(config_text(method, paths, count=1, weight=1.0, density=0.3)),
                     work, f"{method}-1")
    for tool in ("fusion", "mergekit"):
        out3, out1 = _Lazy(three[tool]), _Lazy(one[tool])
        moved = agree = total = kept = nonzero = 0
        factor = size = 0.0
        for name in base.handles:
            b = base[name]
            plain = sum(w * (f[name] - b) for w, f in zip(weights, fts))
            got = out3[name] - b
            m = got != 0
            moved, total = moved + int(m.sum()), total + got.numel()
            agree += int((torch.sign(got[m]) == torch.sign(plain[m])).sum())
            delta, got1 = fts[0][name] - b, out1[name] - b
            k = (got1 != 0) & (delta != 0)
            kept, nonzero = kept + int(k.sum()), nonzero + int((delta != 0).sum())
            if bool(k.any()):  # out − base = s·m⊙δ: the median ratio is the tensor's factor s
                factor += float((got1[k] / delta[k]).median()) * delta.numel()
                size += delta.numel()
        stats[tool] = {"moved": moved / total, "sign of Σwδ": agree / max(moved, 1),
                       "kept": kept / max(nonzero, 1), "factor": factor / max(size, 1)}
    return stats


def _agreement_cells(a: dict) -> list[str]:
    differ = a["tensors"] - a["same"] - a["rounding"]
    causes = ", ".join(f"{k}: {v}" for k, v in a["causes"].items()) or "–"
    return [f"{a['same']} / {a['rounding']} / {differ}", causes, f"{a['worst']:.1e}" if a["worst"] else "–"]


def report(rows: list[dict]) -> str:
    lines = ["| method | fusion s | mergekit s | speed-up | fusion MB | mergekit MB | float32: same / within "
             "rounding / differ | differences put down to | worst relative difference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (fs, fm), (ms, mm) = r["fusion"], r["mergekit"]
        agree = r["agreement"] if r["method"] not in RANDOM else r["seeded"]["density 1"]
        label = r["method"] + (" (density 1)" if r["method"] in RANDOM else "")
        lines.append(f"| {label} | {fs:.2f} | {ms:.2f} | {ms / fs:.1f}× | {fm:.0f} | {mm:.0f} | "
                     + " | ".join(_agreement_cells(agree)) + " |")
    seeded = [r for r in rows if r["method"] in RANDOM]
    if seeded:
        lines += ["", "| seeded method | tool | entries moved (3 models) | of which with the sign of Σwδ | "
                      "kept at density 0.3 (1 model) | rescale factor (1 model) | float32 runs as configured "
                      "(densities 0.5, 0.4, 0.6): same / within rounding / differ |", "|---|---|---|---|---|---|---|"]
        for r in seeded:
            for tool in ("fusion", "mergekit"):
                s = r["seeded"][tool]
                bits = _agreement_cells(r["agreement"])[0] if tool == "fusion" else ""
                lines.append(f"| {r['method']} | {tool} | {s['moved']:.4f} | {s['sign of Σwδ']:.4f} | "
                             f"{s['kept']:.4f} | {s['factor']:.3f} | {bits} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit", required=True, help="path of the mergekit-yaml console script")
    ap.add_argument("--fusion", default=shutil.which("fusion") or str(Path(sys.executable).parent / "fusion"))
    ap.add_argument("--shape", default="tiny", choices=["tiny", "qwen2-0.5b", "qwen2.5-7b"])
    ap.add_argument("--sets", type=Path, default=Path(tempfile.gettempdir()) / "fusion-sets")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--fusion-args", default="", help="extra arguments for fusion merge, e.g. '--kernel torch'")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--recipes", type=Path, metavar="DIR",
                    help="instead: run the published recipes in DIR (e.g. tests/recipes) on tiny stand-ins and "
                         "report, per recipe, whether each tool merges it and how far apart the outputs are")
    ap.add_argument("--only", nargs="+", metavar="PREFIX", help="with --recipes: only the recipes named so")
    args = ap.parse_args()
    args.sets.mkdir(parents=True, exist_ok=True)
    if args.recipes:
        from recipe_agreement import run as run_recipes

        with tempfile.TemporaryDirectory(dir=args.sets) as tmp:
            run_recipes(args.recipes, args.mergekit, Path(tmp), args.sets / "recipe-standins", args.only, args.json)
        return

    tools = Tools(args.fusion, args.mergekit, args.fusion_args)
    paths = make_set(args.shape, args.sets / args.shape)
    size = sum(f.stat().st_size for p in paths.values() for f in p.glob("*.safetensors"))
    print(f"set {args.shape}: {len(paths)} bf16 models, {size / 1e9:.2f} GB in all ({args.sets / args.shape})")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.sets) as tmp:
        work = Path(tmp)
        for method in args.methods:
            text = config_text(method, paths)
            cfg = work / f"{method}-bf16.yaml"
            cfg.write_text(text)
            row = {"method": method}
            for tool in ("fusion", "mergekit"):
                row[tool] = tools.merge(tool, cfg, work / f"out-{method}-{tool}")
                shutil.rmtree(work / f"out-{method}-{tool}")
            row["agreement"] = agreement(tools, text, work, f"{method}-f32")
            if method in RANDOM:
                row["seeded"] = seeded_stats(tools, method, paths, work)
            for out in work.glob("out-*"):
                shutil.rmtree(out)
            rows.append(row)
            a = row["agreement"] if method not in RANDOM else row["seeded"]["density 1"]
            print(f"  {method:<16} fusion {row['fusion'][0]:6.2f} s {row['fusion'][1]:6.0f} MB   mergekit "
                  f"{row['mergekit'][0]:6.2f} s {row['mergekit'][1]:6.0f} MB   " + "  ".join(_agreement_cells(a)),
                  flush=True)
    print()
    print(report(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
