"""Token alignment speed: piecewise alignment (between common token boundaries) against dynamic
time warping over the whole sequence, on the same sequences in the same run.

Two tokenizations of the same synthetic text: one keeps every word whole, the other splits a
share of the words into pieces (as a second vocabulary does). Reports seconds per sequence for
each, their ratio, and whether both give the same alignment path.

    .venv/bin/python benchmarks/align.py [--tokens 512 2048] [--split 0.3] [--sequences 3]
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from fusion.fuse.align import align_tokens, dtw
from fusion.fuse.tokens import edit_distance


def tokenizations(n: int, split: float, rng: random.Random) -> tuple[list[str], list[str]]:
    words = [" " + "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(n)]
    pieces = []
    for w in words:
        if len(w) > 3 and rng.random() < split:
            cut = rng.randint(2, len(w) - 1)
            pieces += [w[:cut], w[cut:]]
        else:
            pieces.append(w)
    return words, pieces


def spans(tokens: list[str]) -> np.ndarray:
    ends = np.cumsum([len(t) for t in tokens])
    return np.stack([ends - [len(t) for t in tokens], ends], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--split", type=float, default=0.3)
    parser.add_argument("--sequences", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(0)
    print(f"{'tokens':>7} {'whole DTW s/seq':>16} {'piecewise s/seq':>16} {'speed-up':>9}  same path")
    for n in args.tokens:
        cases = [tokenizations(n, args.split, rng) for _ in range(args.sequences)]
        timings, same = [], True
        for fn in ("whole", "piecewise"):
            edit_distance.cache_clear()  # do not let one method warm the other's cache
            start = time.perf_counter()
            paths = []
            for a, b in cases:
                sa, sb = spans(a), spans(b)
                paths.append(dtw(a, b, spans_a=sa, spans_b=sb) if fn == "whole" else align_tokens(a, b, sa, sb))
            timings.append((time.perf_counter() - start) / len(cases))
            if fn == "whole":
                reference = paths
            else:
                same = paths == reference
        print(f"{n:>7} {timings[0]:>16.4f} {timings[1]:>16.4f} {timings[0] / timings[1]:>8.1f}x  {same}")


if __name__ == "__main__":
    main()
