"""Target distributions: the source's top-k aligned onto the pivot's positions and vocabulary,
then fused with the pivot's own distribution per sequence by a fusion function.

Position t of the pivot predicts pivot token t+1. When token t+1 is aligned one-to-one with
source token j+1 and tokens t and j end at the same character (both have read the same text),
the source's distribution at position j is carried over, each top-k token mapped to a pivot
token (or dropped); otherwise the position falls back to the pivot's own distribution or the
one-hot gold token.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .cache import load_arrays, save_arrays
from .align import EXACT, FALLBACK, MAPPED, STATUS_NAMES, VocabMap, align_tokens, one_to_one
from ..api.vocab import pivot_index
from ..api.vocab import Alignment, FusionFunction, VocabContext
from .represent import Representations


@dataclass
class Aligned:
    """The source distribution on the pivot's positions: ids (pivot vocabulary, -1 = none), logits."""

    ids: np.ndarray  # [T, k]
    logits: np.ndarray  # [T, k]
    status: np.ndarray  # [T] EXACT / MAPPED / FALLBACK
    coverage: dict = field(default_factory=dict)


def softmax_rows(logits: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Softmax over each row's valid entries (temperature 1); rows without any are all zero."""
    x = np.where(valid, logits.astype(np.float64), -np.inf)
    top = np.max(x, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(valid, np.exp(x - top), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def align(pivot: Representations, source: Representations, pivot_tokens: Sequence[str],
          source_tokens: Sequence[str], alignment: Alignment, fallback: str = "pivot") -> Aligned:
    k = pivot.topk_ids.shape[1]
    paths = []
    cooccurrence: Counter = Counter()
    for i in range(len(pivot)):
        p_ids, s_ids = pivot.input_ids[pivot.span(i)], source.input_ids[source.span(i)]
        a = [pivot_tokens[t] if t < len(pivot_tokens) else "" for t in p_ids]
        b = [source_tokens[t] if t < len(source_tokens) else "" for t in s_ids]
        path = align_tokens(a, b, pivot.offsets[pivot.span(i)], source.offsets[source.span(i)])
        pairs = one_to_one(path)
        # one-to-one pairs whose strings are the same (for the exact / mapped count)
        paths.append({pi: (sj, a[pi] == b[sj]) for pi, sj in pairs.items()})
        for pi, sj in pairs.items():
            cooccurrence[(int(s_ids[sj]), int(p_ids[pi]))] += 1
    context = VocabContext(pivot_tokens, source_tokens, pivot_index(pivot_tokens), cooccurrence)
    vmap = VocabMap(alignment, context)
    vmap.build(source.topk_ids)

    T = len(pivot.input_ids)
    ks = source.topk_ids.shape[1]
    ids = np.full((T, max(k, ks)), -1, dtype=np.int64)
    logits = np.zeros((T, max(k, ks)), dtype=np.float32)
    status = np.full(T, FALLBACK, dtype=np.uint8)
    counted = np.zeros(T, dtype=bool)
    entries = Counter()
    for i, pairs in enumerate(paths):
        ps, ss = pivot.span(i), source.span(i)
        p_ids, s_ids = pivot.input_ids[ps], source.input_ids[ss]
        base = ps.start
        counted[base:ps.stop - 1] = pivot.response[base + 1:ps.stop]
        for t in range(len(p_ids) - 1):
            j, same = pairs.get(t + 1, (None, False))
            row = base + t
            # carry the source's prediction only when both read the same text before it: a
            # one-to-one pair such as "c" ~ "bc" after "ab" / "a" has different contexts
            if j is not None and j >= 1 and pivot.offsets[base + t, 1] == source.offsets[ss.start + j - 1, 1]:
                src = ss.start + j - 1
                mapped = vmap.lookup(source.topk_ids[src])
                seen, col = set(), 0
                for s_id, p_id, value in zip(source.topk_ids[src], mapped, source.topk_logits[src]):
                    if counted[row]:
                        entries[STATUS_NAMES[vmap.how.get(int(s_id), FALLBACK)]] += 1
                    if p_id < 0 or p_id in seen:  # unmapped, or a pivot token already given (higher logit)
                        continue
                    seen.add(int(p_id))
                    ids[row, col], logits[row, col] = p_id, value
                    col += 1
                if col:
                    status[row] = EXACT if same else MAPPED
                    continue
                ids[row], logits[row] = -1, 0.0
            if fallback == "gold":
                ids[row, 0], logits[row, 0] = p_ids[t + 1], 0.0
            else:
                ids[row, :k], logits[row, :k] = pivot.topk_ids[row], pivot.topk_logits[row]
    positions = Counter(STATUS_NAMES[s] for s in status[counted])
    coverage = {"positions": {n: int(positions.get(n, 0)) for n in STATUS_NAMES},
                "topk_tokens": {"exact": int(entries.get("exact", 0)), "mapped": int(entries.get("mapped", 0)),
                                "dropped": int(entries.get("fallback", 0))},
                "vocabulary_pairs": len(cooccurrence)}
    return Aligned(ids, logits, status, coverage)


@dataclass
class FusedTargets:
    """Per pivot position, the fused target distribution as sparse (ids, probs); ids -1 pad."""

    ids: np.ndarray  # [T, m]
    probs: np.ndarray  # [T, m]
    weights: np.ndarray  # [N, 2] per sequence: weight of the pivot's own and the source distribution

    def save(self, path: Path, key: str) -> None:
        save_arrays(path, {"ids": self.ids, "probs": self.probs, "weights": self.weights}, key)

    @classmethod
    def load(cls, path: Path, key: str) -> "FusedTargets | None":
        arrays = load_arrays(path, key)
        return None if arrays is None else cls(**arrays)


def fuse(pivot: Representations, aligned: Aligned, source_ce: np.ndarray, function: FusionFunction) -> FusedTargets:
    k = pivot.topk_ids.shape[1]
    p_probs = softmax_rows(pivot.topk_logits, np.ones_like(pivot.topk_ids, dtype=bool))
    s_probs = softmax_rows(aligned.logits, aligned.ids >= 0)
    T = len(pivot.input_ids)
    m = k + aligned.ids.shape[1]
    ids = np.full((T, m), -1, dtype=np.int64)
    probs = np.zeros((T, m), dtype=np.float32)
    weights = np.zeros((len(pivot), 2), dtype=np.float64)
    for i in range(len(pivot)):
        ce = [float(pivot.ce[i]), float(source_ce[i])]
        w = [1.0, 0.0] if not all(np.isfinite(ce)) else list(function.weights(ce))
        if len(w) != 2 or min(w) < 0 or abs(sum(w) - 1) > 1e-6:
            from ..api.errors import FusionError

            raise FusionError(f"fusion function {function.name!r} returned weights {w} for two candidates; "
                              f"it must return two non-negative weights that sum to 1")
        weights[i] = w
        sl = pivot.span(i)
        both_ids = np.concatenate([pivot.topk_ids[sl].astype(np.int64), aligned.ids[sl]], axis=1)
        both = np.concatenate([w[0] * p_probs[sl], w[1] * s_probs[sl]], axis=1)
        both = np.where(both_ids >= 0, both, 0.0)
        for r in range(both.shape[0]):
            row = {}
            for t_id, pr in zip(both_ids[r], both[r]):
                if t_id >= 0 and pr > 0:
                    row[int(t_id)] = row.get(int(t_id), 0.0) + float(pr)
            for c, (t_id, pr) in enumerate(sorted(row.items(), key=lambda kv: -kv[1])):
                ids[sl.start + r, c], probs[sl.start + r, c] = t_id, pr
    return FusedTargets(ids, probs, weights.astype(np.float32))


def targets_key(*parts) -> str:
    from ..version import __version__

    return hashlib.sha256(json.dumps([__version__, *parts], sort_keys=True, default=str).encode()).hexdigest()
