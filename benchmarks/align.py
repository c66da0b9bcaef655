"""Token alignment speed, each against a baseline measured in the same run.

1. Sequences: piecewise alignment (between common token boundaries) against dynamic time warping
   over the whole sequence. Two tokenizations of the same synthetic text: one keeps every word
   whole, the other splits a share of the words into pieces (as a second vocabulary does).
   Reports seconds per sequence for each, their ratio, and whether both give the same path.
2. Vocabulary (min_ed): the nearest pivot token by edit distance, all tokens of a length compared
   at once, against the same length-pruned search one token at a time in Python; same answers.

    .venv/bin/python benchmarks/align.py [--tokens 512 2048] [--split 0.3] [--sequences 3]
                                         [--vocab 50000] [--queries 30]
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from fusion.fuse.align import align_tokens, dtw
from fusion.api.vocab import VocabContext
from fusion.api.vocab import edit_distance, min_edit_distance_token, pivot_index


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


def scalar_nearest(text: str, by_length: dict[int, list[int]], pivot: list[str]) -> int:
    """The baseline: the same outward search over lengths, one edit distance at a time."""
    best, best_id = None, -1
    for delta in range(0, max(by_length) + len(text) + 1):
        if best is not None and delta > best:
            break
        for length in {len(text) - delta, len(text) + delta}:
            for p in by_length.get(length, ()):
                d = edit_distance(text, pivot[p])
                if best is None or d < best or (d == best and p < best_id):
                    best, best_id = d, p
    return best_id


def vocabulary(size: int, queries: int, rng: random.Random) -> None:
    letters = "abcdefghijklmnopqrstuvwxyz "
    pivot = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 12))) for _ in range(size)]
    texts = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(queries)]
    by_length: dict[int, list[int]] = {}
    for p, s in enumerate(pivot):
        by_length.setdefault(len(s), []).append(p)
    context = VocabContext(pivot, [], pivot_index(pivot))
    min_edit_distance_token("warm-up", context)  # builds the per-length arrays once
    timings, answers = [], []
    for fn in (lambda t: scalar_nearest(t, by_length, pivot), lambda t: min_edit_distance_token(t, context)):
        edit_distance.cache_clear()
        start = time.perf_counter()
        answers.append([fn(t) for t in texts])
        timings.append((time.perf_counter() - start) / len(texts))
    print(f"\nnearest pivot token (min_ed), {size} pivot tokens, {queries} source tokens")
    print(f"{'one at a time ms/token':>24} {'vectorised ms/token':>20} {'speed-up':>9}  same answers")
    print(f"{timings[0] * 1e3:>24.1f} {timings[1] * 1e3:>20.1f} {timings[0] / timings[1]:>8.1f}x  "
          f"{answers[0] == answers[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--split", type=float, default=0.3)
    parser.add_argument("--sequences", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=50000)
    parser.add_argument("--queries", type=int, default=30)
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
    vocabulary(args.vocab, args.queries, rng)


if __name__ == "__main__":
    main()
