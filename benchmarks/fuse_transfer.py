"""How much of a source's knowledge reaches the pivot, by kind of source, on the tiny cases of
tests/fuse_models.py: distillation only (λ = 0) and the pivot's own distribution wherever no
source prediction is carried, so whatever a target learns of the pattern came through alignment.

Sources: the pivot's own vocabulary (source_a, and fine_same beside the word-splitting pivot),
another vocabulary that splits the chat markers (source_b), and `coarse`, whose tokenizer reads
each word as one token where the pivot writes two. Then, on the coarse case, the vocabulary
alignments side by side, FuseChat's own statistics cost among them (a plugin written here: edit
distance without the space markers, ×0.1 when one token contains the other, ×sigmoid(count);
lowest id on ties), and the two fallbacks.

    .venv/bin/python benchmarks/fuse_transfer.py [--dir /tmp/fuse-transfer] [--python PY]

--python runs another install's `fusion` (e.g. an older checkout) on the same cases; variants
it does not know fail and are reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

FUSECHAT_COST = '''
import math

import fusion


class FuseChatStatistics(fusion.Alignment):
    name = "fusechat_statistics"
    description = "FuseChat's statistics cost, for comparison."

    def map_tokens(self, source_ids, context):
        seen = {}
        for (s, p), n in context.cooccurrence.items():
            seen.setdefault(s, {})[p] = n
        out = {}
        for s in source_ids:
            a = context.source_tokens[s].replace(" ", "")
            best = None
            for p in sorted(seen.get(s, ())):
                b = context.pivot_tokens[p].replace(" ", "")
                w = 0.1 if (a in b or b in a) else 1.0
                cost = fusion.edit_distance(a, b) * w / (1 + math.exp(-seen[s][p]))
                if best is None or cost < best[0]:
                    best = (cost, p)
            if best is None:
                best = (0, fusion.min_edit_distance_token(context.source_tokens[s], context))
            if best[1] >= 0:
                out[s] = best[1]
        return out


@fusion.hookimpl
def register_alignments(register):
    register(FuseChatStatistics())
'''


def fuse(python: str, root: Path, name: str, *, pivot: str, sources: tuple[str, ...], data: str, heldout: str,
         alignment: str = "statistics", fallback: str = "pivot", carry: str | None = None,
         max_length: int = 64) -> dict | str:
    from fuse_models import write_config

    extra = f", carry: {carry}" if carry else ""
    config = write_config(root, sources=sources, pivot=pivot, data=data, heldout=heldout, max_length=max_length,
                          alignment=f"{{method: {alignment}, fallback: {fallback}{extra}}}", name=f"{name}.yaml")
    out = root / f"out-{name}"
    cmd = [python, "-m", "fusion", "--plugin", str(root / "fusechat_cost.py"), "fuse", str(config), "-o", str(out),
           "-q", "--force", "--threads", "1"]
    # run from the cases' folder: `-m fusion` from a checkout would import that checkout's fusion
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode:
        return (r.stderr.strip().splitlines() or ["failed"])[-1][:90]
    return json.loads((out / "report.json").read_text())


def row(label: str, report: dict | str, source: str) -> str:
    if isinstance(report, str):
        return f"  {label:<44} {report}"
    held = report["heldout_loss"]
    target = next(iter(held["targets"].values()))
    p = report["alignment"][source]["positions"]
    n = sum(p.values())
    return (f"  {label:<44} {held['pivot']:>7.3f} {target:>8.3f} {target / held['pivot']:>6.2f}  "
            f"{100 * p['exact'] / n:5.1f}% {100 * p['mapped'] / n:5.1f}% {100 * p['fallback'] / n:5.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/fuse-transfer")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()
    import torch

    from fuse_models import build_coarse_case, build_fusion_case

    root = Path(args.dir)
    torch.set_num_threads(1)
    if not (root / "heldout.jsonl").exists():
        build_fusion_case(root)
    if not (root / "coarse-heldout.jsonl").exists():
        build_coarse_case(root)
    (root / "fusechat_cost.py").write_text(FUSECHAT_COST)
    tiny = dict(pivot="pivot", data="train.jsonl", heldout="heldout.jsonl")
    coarse = dict(pivot="fine_pivot", data="coarse-train.jsonl", heldout="coarse-heldout.jsonl", max_length=96)
    header = (f"  {'':<44} {'pivot':>7} {'target':>8} {'ratio':>6}  {'exact':>6} {'mapped':>6} {'fallback':>6}"
              f"\n  {'':<44} {'held-out CE':>16}          positions")
    print(f"knowledge transfer (λ = 0, statistics, unaligned positions learn the pivot's own); {args.python}")
    print(header)
    sources = (("same vocabulary (source_a)", "source_a", tiny),
               ("other vocabulary, split markers (source_b)", "source_b", tiny),
               ("same vocabulary beside a splitting pivot", "fine_same", coarse),
               ("coarser vocabulary, own BOS/EOS (coarse)", "coarse", coarse))
    for label, source, case in sources:
        print(row(label, fuse(args.python, root, source, sources=(source,), **case), source), flush=True)
    print("\nalignment.carry: all (FuseChat: also where the source's next token is only a piece of the pivot's)")
    print(header)
    for label, source, case in sources[1:2] + sources[3:]:
        report = fuse(args.python, root, f"{source}-all", sources=(source,), carry="all", **case)
        print(row(label, report, source), flush=True)
    print("\nthe coarse source by vocabulary alignment and fallback")
    print(header)
    for alignment, fallback in (("fusechat_statistics", "pivot"), ("min_ed", "pivot"), ("exact", "pivot"),
                                ("statistics", "gold"), ("fusechat_statistics", "gold")):
        report = fuse(args.python, root, f"coarse-{alignment}-{fallback}", sources=("coarse",), alignment=alignment,
                      fallback=fallback, **coarse)
        print(row(f"{alignment}, fallback {fallback}", report, "coarse"), flush=True)


if __name__ == "__main__":
    main()
