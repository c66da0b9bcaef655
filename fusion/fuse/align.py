"""Token alignment between two tokenizations of the same text, and vocabulary maps.

1. Positions (:func:`carried`): pivot position t takes the source's prediction at the source
   token that ends on the same character as pivot token t: both have read the same text, so
   both predict what follows it. That covers one-to-one pairs, the last piece of a token the
   other side splits, and a whole token against the other side's last piece (FuseChat's
   suffix rule, decided on character offsets instead of string suffixes).
2. Sequence alignment: dynamic time warping over the two token sequences with an edit-distance
   cost (FuseLLM); every aligned pair is counted for the ``statistics`` vocabulary map.
3. Vocabulary map: a source special token maps to its pivot counterpart, any other token to the
   pivot token with the same surface string, else through the configured
   :class:`~fusion.api.vocab.Alignment` (exact / min_ed / statistics).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from ..api.vocab import Alignment, VocabContext
from ..api.vocab import edit_distance

#: Positions whose next pivot token is exact, mapped or fell back (report order).
EXACT, MAPPED, FALLBACK = 0, 1, 2
STATUS_NAMES = ("exact", "mapped", "fallback")


def pair_cost(a: str, b: str, span_a: Sequence[int], span_b: Sequence[int]) -> int:
    """The cost of aligning two tokens: their edit distance beyond the difference in length (so a
    piece of a split token costs nothing against the whole), plus the characters of the shorter
    span that the other does not cover, plus how far apart the spans lie.

    Plain edit distance makes dynamic time warping prefer the diagonal: it pairs "lo" with " wor"
    rather than aligning both "hel" and "lo" to "hello", which would carry a wrong distribution.
    The span terms keep a token from pairing with a neighbour whose letters it happens to contain.
    """
    overlap = max(0, min(span_a[1], span_b[1]) - max(span_a[0], span_b[0]))
    shorter = min(span_a[1] - span_a[0], span_b[1] - span_b[0])
    gap = max(0, max(span_a[0], span_b[0]) - min(span_a[1], span_b[1]))
    return edit_distance(a, b) - abs(len(a) - len(b)) + max(0, shorter - overlap) + gap


def dtw(a: Sequence[str], b: Sequence[str], band: int = 64, spans_a: np.ndarray | None = None,
        spans_b: np.ndarray | None = None) -> list[tuple[int, int]]:
    """The cheapest monotone alignment path between token strings ``a`` and ``b``.

    Every token of each side is aligned to at least one token of the other; the cost of a pair
    is :func:`pair_cost`. ``spans_a``/``spans_b`` ([n, 2] character start/end of each token in
    the text both were cut from) place the tokens; without them, positions are summed string
    lengths. Cells whose tokens lie more than ``band`` characters apart are skipped (such pairs
    never lie on a good path); when that leaves no path, the full matrix is used.
    """
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return []
    sa = _spans(a) if spans_a is None else np.asarray(spans_a, dtype=np.int64)
    sb = _spans(b) if spans_b is None else np.asarray(spans_b, dtype=np.int64)
    for limit in (band, None):
        path = _dtw(a, b, sa, sb, limit)
        if path is not None:
            return path
    raise AssertionError("unbanded alignment always has a path")


def _spans(tokens: Sequence[str]) -> np.ndarray:
    ends = np.cumsum([len(t) for t in tokens])
    return np.stack([ends - [len(t) for t in tokens], ends], axis=1).astype(np.int64)


def _dtw(a, b, sa, sb, band: int | None) -> list[tuple[int, int]] | None:
    n, m = len(a), len(b)
    inf = float("inf")
    cost = np.full((n, m), inf)
    order = np.argsort(sb[:, 0], kind="stable")
    starts = sb[order, 0]
    for i in range(n):
        if band is None:
            cells = range(m)
        else:
            lo = int(np.searchsorted(starts, sa[i, 0] - band, side="left"))
            hi = int(np.searchsorted(starts, sa[i, 1] + band, side="right"))
            cells = sorted(int(j) for j in order[lo:hi])
        row_prev = cost[i - 1] if i else None
        row = cost[i]
        for j in cells:
            c = pair_cost(a[i], b[j], sa[i], sb[j])
            if i == 0 and j == 0:
                row[j] = c
                continue
            best = inf
            if i and j:
                best = row_prev[j - 1]
            if i and row_prev[j] < best:
                best = row_prev[j]
            if j and row[j - 1] < best:
                best = row[j - 1]
            row[j] = c + best
    if not np.isfinite(cost[n - 1, m - 1]):
        return None
    path = [(n - 1, m - 1)]
    i, j = n - 1, m - 1
    while i or j:
        # prefer the diagonal on ties: it keeps pairs one-to-one
        moves = []
        if i and j:
            moves.append((cost[i - 1, j - 1], i - 1, j - 1))
        if i:
            moves.append((cost[i - 1, j], i - 1, j))
        if j:
            moves.append((cost[i, j - 1], i, j - 1))
        _, i, j = min(moves, key=lambda t: t[0])
        path.append((i, j))
    path.reverse()
    return path


def align_tokens(a: Sequence[str], b: Sequence[str], spans_a: np.ndarray, spans_b: np.ndarray,
                 band: int = 64) -> list[tuple[int, int]]:
    """:func:`dtw` over the whole sequences, computed piecewise between the character positions
    where both tokenizations have a token boundary.

    Both sides cut the same text, so a common boundary splits any sensible alignment in two; a
    token whose span both sides share is a piece of its own, aligned one-to-one at no cost. Only
    the stretches where the tokenizations differ go through dynamic programming, which keeps
    the work near-linear in the sequence length.
    """
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return []
    ends_a, ends_b = np.asarray(spans_a)[:, 1], np.asarray(spans_b)[:, 1]
    path: list[tuple[int, int]] = []
    i0 = j0 = i = j = 0
    while i < n and j < m:
        if ends_a[i] == ends_b[j]:
            if i == i0 and j == j0:
                path.append((i, j))
            else:
                piece = dtw(a[i0:i + 1], b[j0:j + 1], band, spans_a[i0:i + 1], spans_b[j0:j + 1])
                path += [(i0 + x, j0 + y) for x, y in piece]
            i, j = i + 1, j + 1
            i0, j0 = i, j
        elif ends_a[i] < ends_b[j]:
            i += 1
        else:
            j += 1
    if i0 < n and j0 < m:
        piece = dtw(a[i0:], b[j0:], band, spans_a[i0:], spans_b[j0:])
        path += [(i0 + x, j0 + y) for x, y in piece]
    elif i0 < n or j0 < m:  # leftovers on one side only (truncation): attach them to the last pair
        last_i, last_j = path[-1]
        path += [(x, last_j) for x in range(i0, n)] + [(last_i, y) for y in range(j0, m)]
    return path


def one_to_one(path: Sequence[tuple[int, int]]) -> dict[int, int]:
    """Pairs of the path whose tokens are aligned to nothing else: pivot index → source index."""
    count_a = Counter(i for i, _ in path)
    count_b = Counter(j for _, j in path)
    return {i: j for i, j in path if count_a[i] == 1 and count_b[j] == 1}


def carried(pivot_offsets: np.ndarray, source_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every pivot position: the source position whose prediction it takes (-1: none),
    EXACT / MAPPED / FALLBACK, and whether the source's next token is shorter than the pivot's.

    EXACT: the next tokens cover the same characters too. MAPPED: they differ; the source's
    distribution goes through the vocabulary map onto what the pivot writes next. ``finer``:
    the source's next token is only a piece of the pivot's (its prediction names a prefix of
    what the pivot writes; see ``alignment.carry``).
    """
    n, m = len(pivot_offsets), len(source_offsets)
    rows = np.full(n, -1, dtype=np.int64)
    status = np.full(n, FALLBACK, dtype=np.uint8)
    finer = np.zeros(n, dtype=bool)
    if n == 0 or m == 0:
        return rows, status, finer
    pe, se = pivot_offsets[:, 1], source_offsets[:, 1]
    j = np.searchsorted(np.maximum.accumulate(se), pe, side="right") - 1
    jc = np.clip(j, 0, m - 1)
    last = np.ones(n, dtype=bool)
    last[:-1] = pe[1:] != pe[:-1]  # a zero-width pivot token follows: t has not predicted the text yet
    ok = (j >= 0) & (se[jc] == pe) & last
    rows[ok] = j[ok]
    nxt_p = np.minimum(np.arange(n) + 1, n - 1)
    nxt_s = np.minimum(jc + 1, m - 1)
    both = (np.arange(n) + 1 < n) & (jc + 1 < m)
    same = both & (pivot_offsets[nxt_p] == source_offsets[nxt_s]).all(axis=1)
    status[ok] = np.where(same[ok], EXACT, MAPPED)
    finer[ok] = (both & (source_offsets[nxt_s, 1] < pivot_offsets[nxt_p, 1]))[ok]
    return rows, status, finer


class VocabMap:
    """Source token id → pivot token id (or -1), built once for every id the data needs."""

    def __init__(self, alignment: Alignment, context: VocabContext):
        self.alignment = alignment
        self.context = context
        self.table: dict[int, int] = {}
        self.how: dict[int, int] = {}  # EXACT or MAPPED for ids that map

    def build(self, source_ids: np.ndarray) -> None:
        ctx = self.context
        rest = []
        for s in (int(x) for x in np.unique(source_ids) if x >= 0):
            if s in self.table:
                continue
            text = ctx.source_tokens[s] if s < len(ctx.source_tokens) else ""
            p = ctx.pivot_index.get(text, -1) if text else -1
            if s in ctx.counterparts and 0 <= ctx.counterparts[s] < len(ctx.pivot_tokens):
                # before the same-string rule: a source EOS "</s>" stands for the pivot's
                # end-of-turn marker even where the pivot also has a "</s>"
                c = int(ctx.counterparts[s])
                self.table[s], self.how[s] = c, EXACT if c == p else MAPPED
                continue
            self.table[s] = p
            if p >= 0:
                self.how[s] = EXACT
            elif text:
                rest.append(s)
        if rest:
            for s, p in self.alignment.map_tokens(rest, ctx).items():
                if s in self.table and self.table[s] < 0 and 0 <= p < len(ctx.pivot_tokens):
                    self.table[s] = int(p)
                    self.how[s] = MAPPED

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        out = np.array([self.table.get(int(s), -1) for s in ids.ravel()], dtype=np.int64)
        return out.reshape(ids.shape)

    def arrays(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The map as dense arrays over source ids [0, size): pivot id (-1) and EXACT / MAPPED /
        FALLBACK (dropped)."""
        table = np.full(max(size, 1), -1, dtype=np.int32)
        how = np.full(max(size, 1), FALLBACK, dtype=np.uint8)
        for s, p in self.table.items():
            if 0 <= s < size:
                table[s] = p
                how[s] = self.how.get(s, FALLBACK)
        return table, how
