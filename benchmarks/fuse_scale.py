"""`fusion fuse` at more than one process, and its memory as the data grows, each against a
baseline measured in the same run.

1. Throughput: the represent and fuse stages of the tiny case (tests/fuse_models.py: a pivot
   and a source with a different vocabulary) over a data set repeated to --sequences, run by
   one process, by two torchrun processes (gloo), and by one process with two alignment workers.
   Reports each stage's seconds (from report.json) and the ratios to one process.
2. Memory: peak RSS of the represent stage (a fresh process per size) as the data grows
   (--sizes, multiples of --base sequences), next to the same process on one sequence. Flat means
   scoring holds a batch at a time, not the data set. --python runs another install (e.g. an
   older checkout's .venv/bin/python) for comparison.

    .venv/bin/python benchmarks/fuse_scale.py [--dir /tmp/fuse-bench] [--sequences 9000]
                                              [--base 300] [--sizes 1 10 30] [--top-k 64] [--python PY]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

PEAK = ("print('MAXRSS', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0], "
        "file=sys.stderr)")
CHILD = f"""
import sys
from fusion.cli import main
try:
    main(sys.argv[1:])
finally:
    {PEAK}
"""


def config(root: Path, name: str, data: str, top_k: int = 10, chunk: int | None = None) -> Path:
    extra = f", chunk_size: {chunk}" if chunk else ""
    path = root / name
    path.write_text(f"""pivot: ./pivot
sources:
  - model: ./source_b
data: {data}
eval_data: heldout.jsonl
representations: {{top_k: {top_k}, max_length: 64, batch_size: 16{extra}}}
alignment: statistics
training: {{dtype: float32}}
""")
    return path


def repeat(root: Path, name: str, sequences: int) -> str:
    lines = (root / "train.jsonl").read_text().splitlines()
    (root / name).write_text("".join(lines[i % len(lines)] + "\n" for i in range(sequences)))
    return name


def stages(out: Path) -> dict[str, float]:
    report = json.loads((out / "report.json").read_text())
    return {name: s["seconds"] for name, s in report["stages"].items()}


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                               **(env or {})))
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return r


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def calibration() -> float:
    """How much faster two processes run a pure-Python loop than one, on this machine now: the
    most any two-process ratio below can be (other work on the machine takes the rest)."""
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor

    tasks = [1_000_000] * 24
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_spin, tasks[:2]))  # started
        start = time.perf_counter()
        list(pool.map(_spin, tasks))
        two = time.perf_counter() - start
    start = time.perf_counter()
    [_spin(n) for n in tasks]
    return (time.perf_counter() - start) / two


def throughput(root: Path, sequences: int) -> None:
    data = repeat(root, f"train-{sequences}.jsonl", sequences)
    cfg = config(root, "throughput.yaml", data, chunk=64)
    python, torchrun = sys.executable, str(Path(sys.executable).parent / "torchrun")
    single = [python, "-m", "fusion", "fuse", str(cfg), "--threads", "1"]
    runs = {}
    for name, cmd in (("1 process", single + ["--workers", "1"]),
                      ("2 processes (torchrun)", [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "fusion",
                                                  "fuse", str(cfg)]),
                      ("1 process, 2 alignment workers", single + ["--workers", "2"])):
        out = root / f"out-{len(runs)}"
        shutil.rmtree(out, ignore_errors=True)
        if "workers" in name:  # the same representations: only alignment and fusion run
            for folder in (root / "out-0" / "cache").glob("represent-*"):
                shutil.copytree(folder, out / "cache" / folder.name)
        run(cmd + ["-o", str(out), "--until", "fuse", "-q"], root)
        runs[name] = stages(out)
    positions = count_positions(root, data)
    base = runs["1 process"]
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"calibration: a pure-Python loop on 2 processes runs {calibration():.2f}x as fast as on 1 "
          f"(load average {load} on {os.cpu_count()} CPUs)")
    print(f"throughput: {sequences} sequences ({positions} pivot positions), a pivot and a source with another "
          f"vocabulary, chunks of 64; ratio = one process's seconds / these")
    print(f"{'':<32} {'represent s':>12} {'ratio':>6} {'fuse s':>8} {'ratio':>6} {'µs/position':>12}")
    for name, s in runs.items():
        rep = (f"{s['represent']:>12.2f} {base['represent'] / s['represent']:>5.2f}x" if "workers" not in name
               else f"{'(reused)':>12} {'':>6}")
        print(f"{name:<32} {rep} {s['fuse']:>8.2f} {base['fuse'] / s['fuse']:>5.2f}x "
              f"{1e6 * s['fuse'] / positions:>12.1f}")


def count_positions(root: Path, data: str) -> int:
    """Tokens of the data as the pivot reads it (what the representations hold one row each)."""
    from fusion.fuse.data import encode, load_examples
    from fusion.fuse.models import load_tokenizer

    tok = load_tokenizer(root / "pivot", "pivot")
    return sum(len(encode(tok, e, 64)[0]) for e in load_examples(root / data, tok))


def peak_kb(python: str, root: Path, *args: str) -> int:
    r = run([python, "-c", CHILD, *args], root)  # from root: a checkout's fusion is not on the path
    return int([line for line in r.stderr.splitlines() if line.startswith("MAXRSS")][-1].split()[1])


def memory(root: Path, base: int, sizes: list[int], top_k: int, python: str) -> None:
    one = config(root, "memory-1.yaml", repeat(root, "train-1.jsonl", 1), top_k)
    baseline = peak_kb(python, root, "fuse", str(one), "-o", str(root / "mem-1"), "--until", "represent", "-q",
                       "--threads", "1", "--force")
    print(f"\npeak RSS of the represent stage, top-{top_k}; baseline (the same process on one sequence): "
          f"{baseline / 1024:.0f} MB")
    print(f"{'sequences':>10} {'positions':>10} {'peak RSS MB':>12} {'above baseline MB':>18}")
    for size in sizes:
        n = base * size
        cfg = config(root, f"memory-{n}.yaml", repeat(root, f"train-{n}.jsonl", n), top_k)
        kb = peak_kb(python, root, "fuse", str(cfg), "-o", str(root / f"mem-{n}"), "--until", "represent", "-q",
                     "--threads", "1", "--force")
        positions = count_positions(root, f"train-{n}.jsonl")
        print(f"{n:>10} {positions:>10} {kb / 1024:>12.0f} {(kb - baseline) / 1024:>18.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/fuse-bench")
    ap.add_argument("--sequences", type=int, default=9000)
    ap.add_argument("--base", type=int, default=300, help="sequences of the smallest set (above one chunk)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 30])
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--python", default=sys.executable, help="interpreter of the install the memory runs use")
    ap.add_argument("--skip", choices=["throughput", "memory"], default=None)
    args = ap.parse_args()
    import torch

    from fuse_models import build_fusion_case

    root = Path(args.dir)
    if not (root / "heldout.jsonl").exists():
        torch.set_num_threads(1)
        build_fusion_case(root)
    if args.skip != "throughput":
        throughput(root, args.sequences)
    if args.skip != "memory":
        memory(root, args.base, args.sizes, args.top_k, args.python)


if __name__ == "__main__":
    main()
