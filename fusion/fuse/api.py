"""The model-level plugin kind of pairwise fusion: vocabulary alignments and fusion functions.

Both are registered through hooks (``register_alignments``, ``register_fusion_functions``) and
work on plain Python data, so a plugin needs neither torch nor transformers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class VocabContext:
    """What a vocabulary alignment can look at.

    ``pivot_tokens`` / ``source_tokens`` are the surface strings of every token id (the text a
    token stands for, with tokenizer markers such as ``Ġ`` or ``▁`` turned back into spaces);
    ``pivot_index`` maps a pivot surface string to its lowest id; ``cooccurrence`` counts
    ``(source_id, pivot_id)`` pairs of tokens aligned one-to-one over the fusion data.
    """

    pivot_tokens: Sequence[str]
    source_tokens: Sequence[str]
    pivot_index: dict[str, int]
    cooccurrence: Counter = field(default_factory=Counter)


class Alignment:
    """Maps source tokens that have no pivot token with the same string to a pivot token.

    The host first maps every source token to the pivot token with the same surface string;
    :meth:`map_tokens` is asked only about the others. Tokens it leaves out are dropped from
    the aligned distribution.
    """

    #: Name used as ``alignment`` in fuse configs.
    name: str = ""
    #: One line for ``fusion plugins``.
    description: str = ""

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
