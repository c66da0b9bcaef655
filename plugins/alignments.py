"""Built-in vocabulary alignments of pairwise fusion: exact, min_ed and statistics."""

from __future__ import annotations

from collections import defaultdict

import fusion


class Exact(fusion.Alignment):
    name = "exact"
    description = "Only tokens with the same string in both vocabularies; the others are dropped."

    def map_tokens(self, source_ids, context):
        return {}


class MinEditDistance(fusion.Alignment):
    name = "min_ed"
    description = "The pivot token with the minimum edit distance to the source token (FuseLLM)."

    def map_tokens(self, source_ids, context):
        out = {}
        for s in source_ids:
            p = fusion.min_edit_distance_token(context.source_tokens[s], context)
            if p >= 0:
                out[s] = p
        return out


class Statistics(fusion.Alignment):
    name = "statistics"
    description = ("Among the pivot tokens aligned to the source token over the data, the one with the "
                   "minimum edit distance, then the most frequent (FuseChat); min_ed for unseen tokens.")

    def map_tokens(self, source_ids, context):
        seen: dict[int, dict[int, int]] = defaultdict(dict)
        for (s, p), n in context.cooccurrence.items():
            seen[s][p] = n
        out = {}
        for s in source_ids:
            text = context.source_tokens[s]
            counts = seen.get(s)
            if counts:
                out[s] = min(counts, key=lambda p: (fusion.edit_distance(text, context.pivot_tokens[p]), -counts[p], p))
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
