"""Token strings: what each token id stands for, edit distance, and the nearest pivot token.

Plain Python (no numpy, no torch), so plugins that map vocabularies stay light.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Sequence

from .api import VocabContext


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


def _byte_decoder() -> dict[str, int]:
    """The inverse of the byte-level BPE byte → printable-character table (GPT-2)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def surface_strings(tokenizer) -> list[str]:
    """The text each token id stands for, so tokens of different tokenizers can be compared.

    Byte-level BPE tokens (``Ġhello``) are decoded from their byte alphabet; SentencePiece-style
    ``▁`` becomes a space and ``<0x0A>`` byte tokens their character. Ids without a token map to "".
    """
    vocab = tokenizer.get_vocab()
    size = max(max(vocab.values()) + 1, len(tokenizer))
    strings = [""] * size
    try:
        decoder = json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"))
    except AttributeError:  # a slow tokenizer: no byte-level decoder
        decoder = ""
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    byte_level = "ByteLevel" in decoder
    table = _byte_decoder() if byte_level else {}
    for token, i in vocab.items():
        if token in special:
            strings[i] = token
        elif byte_level:
            data = bytes(table[c] for c in token if c in table) if all(c in table for c in token) else None
            strings[i] = data.decode("utf-8", errors="replace") if data is not None else token
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                strings[i] = bytes([int(token[3:5], 16)]).decode("utf-8", errors="replace")
            except ValueError:
                strings[i] = token
        else:
            strings[i] = token.replace("▁", " ")
    return strings


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
