"""The plugin kinds of pairwise fusion: vocabulary alignments and fusion functions, and the
string helpers alignments are built from.

Both kinds are registered through hooks (``register_alignments``, ``register_fusion_functions``)
and work on plain Python data, so a plugin needs neither torch nor transformers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence


@dataclass
class VocabContext:
    """What a vocabulary alignment can look at.

    ``pivot_tokens`` / ``source_tokens`` are the surface strings of every token id (the text a
    token stands for, with tokenizer markers such as ``Ġ`` or ``▁`` turned back into spaces);
    ``pivot_index`` maps a pivot surface string to its lowest id.

    ``cooccurrence`` counts the ``(source_id, pivot_id)`` pairs of tokens aligned with each other
    over the fusion data: every pair of the alignment paths, so a source token the pivot always
    splits is counted with each of its pieces (FuseChat's token alignment matrix).
    ``one_to_one`` counts the subset aligned one-to-one (neither token aligned to anything else).
    ``counterparts`` maps the source's special tokens (BOS, EOS, end of turn) to the pivot's;
    the host applies it before asking the alignment.
    """

    pivot_tokens: Sequence[str]
    source_tokens: Sequence[str]
    pivot_index: dict[str, int]
    cooccurrence: Counter = field(default_factory=Counter)
    one_to_one: Counter = field(default_factory=Counter)
    counterparts: dict[int, int] = field(default_factory=dict)


class Alignment:
    """Maps source tokens that have no pivot token with the same string to a pivot token.

    The host first maps the source's special tokens to their pivot counterparts and every other
    source token to the pivot token with the same surface string; :meth:`map_tokens` is asked
    only about the rest. Tokens it leaves out are dropped from the aligned distribution.
    """

    #: Name used as ``alignment`` in fuse configs.
    name: str = ""
    #: One line for ``fusion plugins``.
    description: str = ""
    #: Whether :meth:`map_tokens` reads ``context.cooccurrence`` / ``one_to_one``: counting the
    #: aligned pairs takes a token alignment of every sequence, which is skipped when False.
    uses_pairs: bool = True

    def map_tokens(self, source_ids: Sequence[int], context: VocabContext) -> dict[int, int]:
        """Return ``{source_id: pivot_id}`` for the given source ids that this alignment maps."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Alignment {self.name}>"


class FusionFunction:
    """Decides, per sequence, how much each candidate distribution contributes to the target.

    The candidates are the pivot's own distribution (index 0) and the aligned source
    distribution (index 1); ``ce`` holds each one's mean cross-entropy against the gold tokens of
    the sequence. The fused target is ``Σ wᵢ pᵢ``.
    """

    #: Name used as ``fusion_function`` in fuse configs.
    name: str = ""
    #: One line for ``fusion plugins``.
    description: str = ""

    def weights(self, ce: Sequence[float]) -> list[float]:
        """Non-negative weights, one per candidate, summing to 1."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<FusionFunction {self.name}>"


@lru_cache(maxsize=1 << 18)
def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def pivot_index(pivot_tokens: Sequence[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, s in enumerate(pivot_tokens):
        if s:
            index.setdefault(s, i)
    return index


def min_edit_distance_token(text: str, context: VocabContext) -> int:
    """The pivot id whose string is closest to ``text`` (lowest id on ties), or -1.

    A string of length L is at least |L − len(text)| edits away, so lengths are searched outwards
    from len(text) and the search stops once no remaining length can beat the best found; each
    length's tokens are compared all at once (a real vocabulary has thousands per length).
    """
    buckets = _buckets(context)
    best, best_id = None, -1
    for delta in range(0, max(buckets, default=0) + len(text) + 1):
        if best is not None and delta > best:
            break
        for length in {len(text) - delta, len(text) + delta}:
            if length not in buckets:
                continue
            ids, codes = buckets[length]
            d = _distances(text, codes)
            low = int(d.min())
            p = int(ids[int((d == low).argmax())])  # ids ascend within a bucket: the lowest id
            if best is None or low < best or (low == best and p < best_id):
                best, best_id = low, p
    return best_id


def _buckets(context: VocabContext) -> dict:
    """Pivot tokens by string length: (ids, [n, length] code points), built once per context."""
    import numpy as np

    cached = getattr(context, "_buckets", None)
    if cached is None:
        by_length: dict[int, list[int]] = {}
        for p, s in enumerate(context.pivot_tokens):
            if s:
                by_length.setdefault(len(s), []).append(p)
        cached = {length: (np.array(ids), np.array([[ord(c) for c in context.pivot_tokens[p]] for p in ids],
                                                   dtype=np.int64))
                  for length, ids in by_length.items()}
        context._buckets = cached  # type: ignore[attr-defined]
    return cached


def _distances(text: str, codes):
    """Levenshtein distance from ``text`` to each row of ``codes`` (equal-length strings), the
    dynamic programme run over all rows at once."""
    import numpy as np

    n, length = codes.shape
    prev = np.tile(np.arange(length + 1), (n, 1))
    for i, ch in enumerate(text, 1):
        cur = np.empty_like(prev)
        cur[:, 0] = i
        differs = codes != ord(ch)
        for j in range(1, length + 1):
            cur[:, j] = np.minimum(np.minimum(prev[:, j], cur[:, j - 1]) + 1, prev[:, j - 1] + differs[:, j - 1])
        prev = cur
    return prev[:, length]
