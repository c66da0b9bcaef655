"""Token strings: what each token id of a tokenizer stands for.

Edit distances and the nearest pivot token are part of the plugin contract (fusion.api.vocab).
"""

from __future__ import annotations

import json


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
