"""Built-in vocabulary alignments of pairwise fusion: exact, min_ed and statistics."""

from __future__ import annotations

from collections import defaultdict

import fusion


class Exact(fusion.Alignment):
    name = "exact"
    description = "Only tokens with the same string in both vocabularies; the others are dropped."
    uses_pairs = False

    def map_tokens(self, source_ids, context):
        return {}


class MinEditDistance(fusion.Alignment):
    name = "min_ed"
    description = "The pivot token with the minimum edit distance to the source token (FuseLLM)."
    uses_pairs = False

    def map_tokens(self, source_ids, context):
        out = {}
        for s in source_ids:
            p = fusion.min_edit_distance_token(context.source_tokens[s], context)
            if p >= 0:
                out[s] = p
        return out


def continues(a: str, b: str) -> bool:
    """One string starts the other (leading spaces aside): the pivot token that begins where a
    source token begins and covers a piece of it, or all of it and more."""
    if a.startswith(b) or b.startswith(a):
        return True
    a, b = a.lstrip(), b.lstrip()
    return bool(a and b) and (a.startswith(b) or b.startswith(a))


class Statistics(fusion.Alignment):
    name = "statistics"
    description = ("Among the pivot tokens aligned with the source token over the data, one that starts "
                   "it (or that it starts), then the minimum edit distance, then the most frequent "
                   "(FuseChat's statistics); min_ed for tokens never aligned.")

    def map_tokens(self, source_ids, context):
        # A source prediction at a position names the text that follows; the pivot token it stands
        # for starts at the same character. When the pivot splits the source token, that is its
        # first piece: a prefix, which edit distance alone cannot tell from the last piece.
        seen: dict[int, dict[int, int]] = defaultdict(dict)
        for (s, p), n in context.cooccurrence.items():
            seen[s][p] = n
        out = {}
        for s in source_ids:
            text = context.source_tokens[s]
            counts = seen.get(s)
            if counts:
                out[s] = min(counts, key=lambda p: (not continues(text, context.pivot_tokens[p]),
                                                    fusion.edit_distance(text, context.pivot_tokens[p]),
                                                    -counts[p], p))
            else:
                p = fusion.min_edit_distance_token(text, context)
                if p >= 0:
                    out[s] = p
        return out


@fusion.hookimpl
def register_alignments(register):
    register(Exact())
    register(MinEditDistance())
    register(Statistics())
