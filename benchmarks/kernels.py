"""Speed and memory of `fusion merge` with the C kernels, the torch reference and (optionally)
mergekit, on a Qwen2-0.5B-shaped base and three bf16 fine-tunes (~1 GB each).

    .venv/bin/python benchmarks/kernels.py --dir /tmp/fusion-bench [--shape 0.5b|7b]
        [--methods task_arithmetic ties sce] [--repeats 3] [--threads N]
        [--mergekit PATH/TO/mergekit-yaml [--mergekit-repeats 1]] [--chart kernels.png] [--keep-outputs]

The model set is made under DIR/<shape>/ once and reused. Every merge runs as a fresh process
(start-up and imports included, as users see it), after one warm-up read of the inputs, so the
page cache is warm. Reported: the median and best wall time over the repeats (on a shared
machine the best is the better estimate of what the code costs), the median merge time fusion
reports itself, peak RSS (the process's own high-water mark), and ratios of the median wall time
against the time to read the inputs the method reads (the base and up to three fine-tunes) and
write one output file, measured in the same run. This script never
imports torch itself, so the RSS of the processes it starts is theirs alone.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# --shape names → benchmarks/modelsets.py shapes (made there, in a child process: this script
# never imports torch)
SHAPES = {"0.5b": "qwen2-0.5b", "7b": "qwen2.5-7b"}
MODELS = ("base", "ft1", "ft2", "ft3")
CONFIGS = {
    "linear": "parameters: {weight: 0.3}",
    "task_arithmetic": "parameters: {weight: 0.3, lambda: 1.0}",
    "ties": "parameters: {weight: 0.3, density: 0.5}",
    "sce": "parameters: {select_topk: 0.1}",
    "dare_linear": "parameters: {weight: 0.3, density: 0.5}",
    "dare_ties": "parameters: {weight: 0.3, density: 0.5}",
    "breadcrumbs": "parameters: {weight: 0.3, density: 0.5, gamma: 0.01}",
    "breadcrumbs_ties": "parameters: {weight: 0.3, density: 0.5, gamma: 0.01}",
    "della": "parameters: {weight: 0.3, density: 0.5, epsilon: 0.1}",
    "della_linear": "parameters: {weight: 0.3, density: 0.5, epsilon: 0.1}",
    "slerp": "parameters: {t: 0.4}",
    "nuslerp": "parameters: {weight: 0.5}",
    "multislerp": "parameters: {weight: 0.3}",
    "karcher": "parameters: {max_iter: 10}",
    "model_stock": "parameters: {filter_wise: false}",
    "nearswap": "parameters: {t: 0.001}",
    "arcee_fusion": "",
    "ram": "parameters: {epsilon: 0.001}",
    "ramplus_tl": "parameters: {epsilon: 0.001}",
    "passthrough": "parameters: {scale: 1.0}",
}
#: methods that merge fewer than the three fine-tunes (the first ones are taken)
MODEL_COUNTS = {"slerp": 1, "nearswap": 1, "arcee_fusion": 1, "passthrough": 1, "nuslerp": 2}
#: methods that take no base model: their configs name none (mergekit would merge it as one more)
NO_BASE = {"linear", "karcher", "passthrough"}

# Runs `fusion` in this process and reports its own peak RSS (VmHWM) on stderr.
FUSION = """
import sys
from fusion.cli import main
try:
    main(sys.argv[1:])
finally:
    print('VMHWM', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr)
"""
# The same around another console script (mergekit-yaml), run with its own interpreter.
SCRIPT = """
import runpy, sys
path = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    runpy.run_path(path, run_name='__main__')
finally:
    print('VMHWM', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr)
"""


def make_set(root: Path, shape: str) -> None:
    if (root / ".complete").is_file():
        return
    print(f"making the {shape} model set under {root} (once)...", flush=True)
    script = Path(__file__).resolve().parent / "modelsets.py"
    subprocess.run([sys.executable, str(script), SHAPES[shape], str(root)], check=True)


def read_all(files: list[Path], buf: bytearray) -> int:
    view, total = memoryview(buf), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total


def io_baseline(root: Path, out: Path, repeats: int = 1) -> tuple[dict[str, float], float]:
    """Seconds to read each input, and to write one output of the base's size (the best of
    ``repeats`` tries: on a shared machine the write's time swings with others' writeback)."""
    best = [io_once(root, out) for _ in range(max(1, repeats))]
    return {m: min(r[0][m] for r in best) for m in MODELS}, min(r[1] for r in best)


def io_once(root: Path, out: Path) -> tuple[dict[str, float], float]:
    buf = bytearray(64 << 20)
    files = {m: sorted((root / m).glob("*.safetensors")) for m in MODELS}
    read_all([f for fs in files.values() for f in fs], buf)  # warm the page cache
    reads = {}
    for m, fs in files.items():
        start = time.perf_counter()
        read_all(fs, buf)
        reads[m] = time.perf_counter() - start
    size = sum(f.stat().st_size for f in files[MODELS[0]])
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / "model.safetensors", "wb") as fh:
        for _ in range(0, size, len(buf)):
            fh.write(buf)
    write_s = time.perf_counter() - start
    shutil.rmtree(out)
    return reads, write_s


def used_models(method: str) -> tuple[str, ...]:
    """The base (where the method takes one) and the fine-tunes a method's config names."""
    return MODELS[1 if method in NO_BASE else 0:1 + MODEL_COUNTS.get(method, 3)]


def timed(cmd: list[str]) -> tuple[float, int, str, float]:
    """(wall seconds, peak RSS in MB, output, CPU seconds: user + system, every thread) of one
    command. Wall time well above CPU time / threads is time spent waiting: for the disk, or for
    the CPUs other processes hold."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    peak = [int(l.split()[1]) for l in proc.stderr.splitlines() if l.startswith("VMHWM")]
    return wall, (peak[-1] // 1024 if peak else -1), proc.stdout + proc.stderr, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="where the model set lives (made once)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--methods", nargs="+", choices=sorted(CONFIGS), default=["task_arithmetic", "ties", "sce"])
    ap.add_argument("--kernels", nargs="+", choices=["c", "torch"], default=["c", "torch"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--mergekit", default=None, help="path to mergekit-yaml, to time it too")
    ap.add_argument("--mergekit-repeats", type=int, default=None,
                    help="runs of mergekit per method (default --repeats; it is the slow one)")
    ap.add_argument("--chart", type=Path, default=None, help="PNG chart (default DIR/<shape>/kernels.png)")
    ap.add_argument("--keep-outputs", action="store_true")
    args = ap.parse_args()

    root = args.dir / args.shape
    make_set(root, args.shape)
    reads, write_s = io_baseline(root, root / "io-probe", args.repeats)
    read_s = sum(reads.values())
    io_s = read_s + write_s
    print(f"I/O baseline: read 4 inputs {read_s:.2f} s + write one output {write_s:.2f} s = {io_s:.2f} s "
          f"(best of {args.repeats}, warm page cache; a method that reads fewer inputs is compared with "
          f"reading those)\n", flush=True)

    runners = [(k, lambda cfg, out, k=k: [sys.executable, "-c", FUSION, "merge", str(cfg), "-o", str(out),
                                          "--force", "--kernel", k]
                + (["--threads", str(args.threads)] if args.threads else [])) for k in args.kernels]
    if args.mergekit:
        with open(args.mergekit) as fh:
            first = fh.readline()
        python = first[2:].strip() if first.startswith("#!") else sys.executable
        runners.append(("mergekit", lambda cfg, out: [python, "-c", SCRIPT, args.mergekit, str(cfg), str(out)]))

    rows = []
    for method in args.methods:
        cfg = root / f"{method}.yaml"
        base = "" if method in NO_BASE else f"base_model: {root / 'base'}\n"
        cfg.write_text(f"merge_method: {method}\n{base}models:\n"
                       + "".join(f"  - model: {root / m}\n" for m in used_models(method) if m != "base")
                       + f"{CONFIGS[method]}\ndtype: bfloat16\n")
        for name, command in runners:
            out = root / f"out-{method}-{name}"
            walls, peaks, merge_s, cpus = [], [], [], []
            repeats = args.repeats if name != "mergekit" else (args.mergekit_repeats or args.repeats)
            for _ in range(repeats):
                wall, peak, text, cpu = timed(command(cfg, out))
                walls.append(wall)
                cpus.append(cpu)
                peaks.append(peak)
                m = re.search(r"in \d+ file\(s\), ([\d.]+) s", text)
                if m:
                    merge_s.append(float(m.group(1)))
            rows.append({"method": method, "kernel": name, "wall": statistics.median(walls),
                         "io": sum(reads[m] for m in used_models(method)) + write_s,
                         "walls": walls, "merge": statistics.median(merge_s) if merge_s else None,
                         "rss": max(peaks), "cpu": statistics.median(cpus)})
            r = rows[-1]
            print(f"{method:<16} {name:<8} wall {r['wall']:6.2f} s  (runs {', '.join(f'{w:.2f}' for w in walls)})"
                  f"  merge {r['merge'] if r['merge'] is not None else float('nan'):6.2f} s  "
                  f"peak RSS {r['rss']:5d} MB  CPU {r['cpu']:6.2f} s", flush=True)
            if not args.keep_outputs:
                shutil.rmtree(out, ignore_errors=True)

    print(f"\n{'method':<16} {'kernel':<8} {'wall s':>7} {'best s':>7} {'merge s':>8} {'CPU s':>7} {'peak MB':>8} "
          f"{'wall/IO':>8} {'merge/IO':>9} {'vs torch':>9} {'vs mergekit':>12}")
    for r in rows:
        ref = {x["kernel"]: x["wall"] for x in rows if x["method"] == r["method"]}
        vs = lambda k: f"{ref[k] / r['wall']:.1f}x" if k in ref and r["kernel"] != k else "-"  # noqa: E731
        merge = f"{r['merge']:.2f}" if r["merge"] is not None else "-"
        merge_io = f"{r['merge'] / r['io']:.1f}" if r["merge"] is not None else "-"
        print(f"{r['method']:<16} {r['kernel']:<8} {r['wall']:>7.2f} {min(r['walls']):>7.2f} {merge:>8} "
              f"{r['cpu']:>7.2f} {r['rss']:>8d} "
              f"{r['wall'] / r['io']:>8.1f} {merge_io:>9} {vs('torch'):>9} {vs('mergekit'):>12}")
    print(f"(I/O baseline {io_s:.2f} s for 4 inputs, less for methods that read fewer; "
          f"'vs X' = X's wall time / this wall time; "
          f"{os.cpu_count()} CPUs; timings on a shared machine are noisy)")
    chart(rows, args.chart or root / "kernels.png")


def chart(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart")
        return
    methods = list(dict.fromkeys(r["method"] for r in rows))
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(kernels)
    for i, k in enumerate(kernels):
        xs = [m + i * width for m in range(len(methods))]
        by = {r["method"]: r for r in rows if r["kernel"] == k}
        ax.bar(xs, [by[m]["wall"] if m in by else 0 for m in methods], width, label=k)
        ax2.bar(xs, [by[m]["rss"] if m in by else 0 for m in methods], width, label=k)
    # each method's own I/O floor (the inputs it reads + one output), as in the table
    io = {r["method"]: r["io"] for r in rows}
    ax.plot([m + width * (len(kernels) - 1) / 2 for m in range(len(methods))], [io[m] for m in methods],
            "k_", markersize=18, label="read its inputs + write output")
    for a, title in ((ax, "wall time (s)"), (ax2, "peak RSS (MB)")):
        a.set_xticks([m + width * (len(kernels) - 1) / 2 for m in range(len(methods))], methods)
        a.set_title(title)
        a.legend()
    ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"chart: {path}")


if __name__ == "__main__":
    main()
