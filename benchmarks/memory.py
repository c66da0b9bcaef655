"""Peak memory of `fusion merge` as the model grows, at fixed tensor sizes.

Builds Qwen2-shaped bf16 models (a base and three fine-tunes) with more and more layers of the
same width, merges each with task arithmetic in a fresh process, and reports peak RSS next to the
baseline of a process that only imports what that kernel path imports (fusion, plus torch for
`--kernel torch`; the C path never imports torch), measured in the same run. Flat memory means
the extra RSS tracks the largest tensor, not the model size.

    .venv/bin/python benchmarks/memory.py [--layers 2 8 32] [--hidden 512] [--kernel c|torch]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child would report the
# benchmark's own peak (it builds the models) instead of its own.
PEAK = "print('MAXRSS', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr)"
CHILD = f"""
import sys
from fusion.cli import main
try:
    main(sys.argv[1:])
finally:
    {PEAK}
"""
BASELINE = {
    "torch": f"import sys, torch, fusion.stream, fusion.planner\ntorch.ones(4).sum()\n{PEAK}",
    "c": f"import sys, numpy, fusion.stream, fusion.planner, fusion.api.kernels\n{PEAK}",
}


def peak_kb(code: str, *args: str) -> int:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    return int([l for l in r.stderr.splitlines() if l.startswith("MAXRSS")][-1].split()[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--kernel", choices=["c", "torch"], default="c")
    args = ap.parse_args()
    from fusion.demo import TINY_QWEN2, make_family, qwen2_tensor_shapes, write_model

    base_rss = peak_kb(BASELINE[args.kernel])
    print(f"--kernel {args.kernel}; baseline (python + what that path imports): {base_rss / 1024:.0f} MB")
    print(f"{'layers':>6} {'model MB':>9} {'largest MB':>10} {'peak RSS MB':>11} {'above baseline':>14}")
    for layers in args.layers:
        cfg = dict(TINY_QWEN2, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                   num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2, vocab_size=16000)
        shapes = qwen2_tensor_shapes(cfg)
        sizes = [2 * eval("*".join(map(str, s))) for s in shapes.values()]
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            family = make_family(root, cfg)
            import torch

            third = {n: (t.float() + 0.001).to(torch.bfloat16) for n, t in family["base"].items()}
            write_model(root / "third", cfg, third)
            del family, third
            (root / "merge.yaml").write_text(
                "merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n"
                "  - model: ./chat\n  - model: ./code\n  - model: ./third\n")
            for f in root.glob("*/model.safetensors"):  # warm the page cache
                f.read_bytes()
            rss = peak_kb(CHILD, "merge", str(root / "merge.yaml"), "-o", str(root / "out"), "-q",
                          "--kernel", args.kernel)
        print(f"{layers:>6} {sum(sizes) / 1e6:>9.0f} {max(sizes) / 1e6:>10.1f} {rss / 1024:>11.0f} "
              f"{(rss - base_rss) / 1024:>14.0f}")


if __name__ == "__main__":
    main()
