"""Target distributions: the source's top-k carried onto the pivot's positions and vocabulary,
then fused with the pivot's own distribution per sequence by a fusion function.

Pivot position t takes the source's prediction where both have read the same text
(:func:`fusion.fuse.align.carried`); each of its top-k tokens goes through the vocabulary map
(or is dropped). Other positions fall back to the one-hot gold token (FuseChat) or the pivot's
own distribution. The work is split in two passes over chunks of sequences so that the chunks
can be spread over processes: :func:`positions` (which source position each pivot position
takes, and the aligned token pairs the ``statistics`` map counts), then, once the vocabulary map
is built from all chunks' pairs, :func:`apply_map` and :func:`fuse`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..api.vocab import Alignment, FusionFunction, VocabContext, pivot_index
from .align import EXACT, FALLBACK, MAPPED, STATUS_NAMES, VocabMap, align_tokens, carried, one_to_one
from .represent import Representations


@dataclass
class Aligned:
    """The source distribution on the pivot's positions: ids (pivot vocabulary, -1 = none), logits."""

    ids: np.ndarray  # [T, k]
    logits: np.ndarray  # [T, k]
    status: np.ndarray  # [T] EXACT / MAPPED / FALLBACK
    coverage: dict = field(default_factory=dict)


@dataclass
class FusedTargets:
    """Per pivot position, the fused target distribution as sparse (ids, probs); ids -1 pad."""

    ids: np.ndarray  # [T, m]
    probs: np.ndarray  # [T, m]
    weights: np.ndarray  # [N, 2] per sequence: weight of the pivot's own and the source distribution


def softmax_rows(logits: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Softmax over each row's valid entries (temperature 1); rows without any are all zero."""
    x = np.where(valid, logits.astype(np.float64), -np.inf)
    top = np.max(x, axis=-1, keepdims=True) if x.shape[-1] else np.zeros(x.shape[:-1] + (1,))
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(valid, np.exp(x - top), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


def target_mask(reps: Representations) -> np.ndarray:
    """Positions whose next token is a response token of the same sequence (training targets)."""
    mask = np.zeros(len(reps.input_ids), dtype=bool)
    mask[:-1] = reps.response[1:]
    if len(reps):
        mask[reps.starts[1:] - 1] = False
    return mask


def positions(pivot: Representations, source: Representations, pivot_tokens: Sequence[str],
              source_tokens: Sequence[str], pairs: bool = True) -> dict[str, np.ndarray]:
    """Pass 1 over a chunk: per pivot position the source row it takes (-1: none) and its status,
    the source ids any carried row holds, and (``pairs``) the aligned token pairs with counts."""
    rows = np.full(len(pivot.input_ids), -1, dtype=np.int64)
    status = np.full(len(pivot.input_ids), FALLBACK, dtype=np.uint8)
    finer = np.zeros(len(pivot.input_ids), dtype=bool)
    every: Counter = Counter()
    single: Counter = Counter()
    for i in range(len(pivot)):
        ps, ss = pivot.span(i), source.span(i)
        r, st, fi = carried(pivot.offsets[ps], source.offsets[ss])
        rows[ps] = np.where(r >= 0, r + ss.start, -1)
        status[ps], finer[ps] = st, fi
        if not pairs:
            continue
        p_ids, s_ids = pivot.input_ids[ps], source.input_ids[ss]
        a = [pivot_tokens[t] if t < len(pivot_tokens) else "" for t in p_ids]
        b = [source_tokens[t] if t < len(source_tokens) else "" for t in s_ids]
        path = align_tokens(a, b, pivot.offsets[ps], source.offsets[ss])
        every.update((int(s_ids[j]), int(p_ids[t])) for t, j in path)
        single.update((int(s_ids[j]), int(p_ids[t])) for t, j in one_to_one(path).items())
    used = source.topk_ids[rows[rows >= 0]]
    out = {"rows": rows.astype(np.int32), "status": status, "finer": finer.astype(np.uint8),
           "needed": np.unique(used).astype(np.int32)}
    for name, counts in (("pairs", every), ("one_to_one", single)):
        keys = np.array(list(counts.keys()), dtype=np.int64).reshape(-1, 2)
        out[name] = np.concatenate([keys, np.array(list(counts.values()), dtype=np.int64)[:, None]], axis=1)
    return out


def counter(table: np.ndarray) -> Counter:
    return Counter({(int(s), int(p)): int(n) for s, p, n in table})


def vocabulary(alignment: Alignment, context: VocabContext, needed: np.ndarray, size: int):
    """The vocabulary map for the source ids ``needed``, as dense arrays over [0, size)."""
    vmap = VocabMap(alignment, context)
    vmap.build(needed)
    return vmap.arrays(size)


def apply_map(pivot: Representations, source: Representations, rows: np.ndarray, status: np.ndarray,
              finer: np.ndarray, table: np.ndarray, how: np.ndarray, fallback: str = "gold",
              carry: str = "coarser") -> Aligned:
    """Pass 2 over a chunk: the carried source top-k mapped onto the pivot vocabulary (each
    pivot token once, at its highest logit), and the fallback where nothing is carried.

    ``carry``: ``coarser`` leaves out the positions where the source's next token is only a
    piece of the pivot's (``finer``): there the source names a prefix of what the pivot writes,
    and the same-string map would teach the pivot a token it never writes there. ``all``
    carries them too, as FuseChat's code does."""
    k, ks = pivot.topk_ids.shape[1], source.topk_ids.shape[1]
    T = len(pivot.input_ids)
    width = max(k, ks)
    ids = np.full((T, width), -1, dtype=np.int64)
    logits = np.zeros((T, width), dtype=np.float32)
    status = np.array(status, dtype=np.uint8)
    rows = np.array(rows, dtype=np.int64)
    if carry == "coarser":
        drop = np.asarray(finer, dtype=bool) & (rows >= 0)
        rows[drop], status[drop] = -1, FALLBACK
    counted = target_mask(pivot)
    sel = np.flatnonzero(rows >= 0)
    src = source.topk_ids[rows[sel]].astype(np.int64)
    inside = (src >= 0) & (src < len(table))
    mapped = np.where(inside, table[np.clip(src, 0, len(table) - 1)], -1).astype(np.int64)
    kinds = np.where(inside, how[np.clip(src, 0, len(how) - 1)], FALLBACK)
    earlier = np.tril(np.ones((ks, ks), dtype=bool), -1)
    dup = ((mapped[:, :, None] == mapped[:, None, :]) & earlier[None]).any(axis=2)
    valid = (mapped >= 0) & ~dup
    order = np.argsort(~valid, axis=1, kind="stable")
    ids[sel, :ks] = np.where(np.take_along_axis(valid, order, 1), np.take_along_axis(mapped, order, 1), -1)
    logits[sel, :ks] = np.where(np.take_along_axis(valid, order, 1),
                                np.take_along_axis(source.topk_logits[rows[sel]].astype(np.float32), order, 1), 0.0)
    status[sel[~valid.any(axis=1)]] = FALLBACK
    entries = np.bincount(kinds[counted[sel]].ravel(), minlength=3)
    back = np.flatnonzero(status == FALLBACK)
    ids[back], logits[back] = -1, 0.0
    if fallback == "gold":
        nxt = np.append(pivot.input_ids[1:], pivot.input_ids[-1:]) if T else pivot.input_ids
        ids[back, 0] = nxt[back]
    else:
        ids[back, :k], logits[back, :k] = pivot.topk_ids[back], pivot.topk_logits[back]
    where = np.bincount(status[counted], minlength=3)
    coverage = {"positions": {n: int(where[i]) for i, n in enumerate(STATUS_NAMES)},
                "topk_tokens": {"exact": int(entries[EXACT]), "mapped": int(entries[MAPPED]),
                                "dropped": int(entries[FALLBACK])}}
    return Aligned(ids, logits, status, coverage)


def align(pivot: Representations, source: Representations, pivot_tokens: Sequence[str],
          source_tokens: Sequence[str], alignment: Alignment, fallback: str = "gold",
          counterparts: dict[int, int] | None = None, carry: str = "coarser") -> Aligned:
    """Both passes over data held in memory (one chunk, or a hand-made case)."""
    first = positions(pivot, source, pivot_tokens, source_tokens, pairs=alignment.uses_pairs)
    context = VocabContext(pivot_tokens, source_tokens, pivot_index(pivot_tokens), counter(first["pairs"]),
                           counter(first["one_to_one"]), dict(counterparts or {}))
    table, how = vocabulary(alignment, context, first["needed"], len(source_tokens))
    aligned = apply_map(pivot, source, first["rows"], first["status"], first["finer"], table, how, fallback, carry)
    aligned.coverage["vocabulary_pairs"] = len(first["pairs"])
    return aligned


def sequence_weights(pivot_ce: np.ndarray, source_ce: np.ndarray, function: FusionFunction) -> np.ndarray:
    """[N, 2]: the fusion function's weights of the pivot's own and the source distribution."""
    from ..api.errors import FusionError

    out = np.zeros((len(pivot_ce), 2), dtype=np.float64)
    for i, ce in enumerate(zip(pivot_ce.tolist(), source_ce.tolist())):
        w = [1.0, 0.0] if not all(np.isfinite(ce)) else list(function.weights(list(ce)))
        if len(w) != 2 or min(w) < 0 or abs(sum(w) - 1) > 1e-6:
            raise FusionError(f"fusion function {function.name!r} returned weights {w} for two candidates; "
                              f"it must return two non-negative weights that sum to 1")
        out[i] = w
    return out


def fuse(pivot: Representations, aligned: Aligned, source_ce: np.ndarray | None = None,
         function: FusionFunction | None = None, weights: np.ndarray | None = None) -> FusedTargets:
    """Σ wᵢ pᵢ per position, with one pair of weights per sequence (given, or from ``function``)."""
    if weights is None:
        weights = sequence_weights(pivot.ce, source_ce, function)
    w = np.repeat(weights, pivot.lengths.astype(np.int64), axis=0)  # [T, 2]
    p_ids = pivot.topk_ids.astype(np.int64)
    s_ids = aligned.ids
    P = w[:, :1] * softmax_rows(pivot.topk_logits, np.ones_like(p_ids, dtype=bool))
    S = w[:, 1:] * softmax_rows(aligned.logits, s_ids >= 0)
    match = (s_ids[:, :, None] == p_ids[:, None, :]) & (s_ids[:, :, None] >= 0)  # [T, ks, k]
    P = P + (match * S[:, :, None]).sum(axis=1)
    S = np.where(match.any(axis=2), 0.0, S)
    both_ids = np.concatenate([p_ids, s_ids], axis=1)
    both = np.concatenate([P, S], axis=1)
    keep = (both_ids >= 0) & (both > 0)
    both = np.where(keep, both, 0.0)
    order = np.argsort(-both, axis=1, kind="stable")
    m = max(1, int(keep.sum(axis=1).max())) if len(both) else 1
    ids = np.take_along_axis(np.where(keep, both_ids, -1), order, 1)[:, :m]
    probs = np.take_along_axis(both, order, 1)[:, :m].astype(np.float32)
    return FusedTargets(ids, probs, weights.astype(np.float32))


def targets_key(*parts) -> str:
    from ..version import __version__

    return hashlib.sha256(json.dumps([__version__, *parts], sort_keys=True, default=str).encode()).hexdigest()
