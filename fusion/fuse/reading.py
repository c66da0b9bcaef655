"""How each model reads the fusion data, as FuseChat has them read it.

The data is rendered once, with the pivot's chat template (:mod:`fusion.fuse.data`). Every model
then reads that text with its own special tokens: the pivot's BOS is dropped from the front and
the model's own BOS put there (when the model starts its sequences with one), and the pivot's
end-of-turn and end-of-sequence markers become the model's own. Other pivot special tokens stay
as they are: a model that lacks them reads them as plain text, as FuseChat's shared template has
every model read the role names.

A source scoring the pivot's markers as text would pay for tokens it never saw in training, which
inflates its cross-entropy and so tilts ``min_ce`` toward the pivot. Token offsets are mapped back
into the pivot text, so every model's tokens are placed on the same characters for alignment.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_PROBE_USER, _PROBE_REPLY = "fusionprobeuser", "fusionprobereply"
_markers: "weakref.WeakKeyDictionary[Any, tuple[Any, Markers]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Markers:
    """A tokenizer's special tokens as its own chat template and tokenizer use them."""

    bos: str | None
    bos_id: int | None
    eos: str | None
    eos_id: int | None
    end_of_turn: str | None  # what its template writes right after an assistant message
    end_of_turn_id: int | None  # when that is one special token
    bos_in_text: bool  # the tokenizer puts BOS in front of plain text
    bos_in_chat: bool  # its chat template starts with BOS (or, without one, as plain text)
    specials: tuple[str, ...] = ()


def special_tokens(tokenizer) -> list[str]:
    names = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            names.add(str(token))
    return sorted(names, key=lambda s: (-len(s), s))


def markers(tokenizer) -> Markers:
    """The tokenizer's BOS, EOS and end-of-turn marker (computed once per tokenizer and template)."""
    template = getattr(tokenizer, "chat_template", None)
    try:
        seen, found = _markers[tokenizer]
        if seen == template:
            return found
    except (KeyError, TypeError):
        pass
    specials = special_tokens(tokenizer)
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    eos, eos_id = getattr(tokenizer, "eos_token", None), getattr(tokenizer, "eos_token_id", None)
    if bos_id is None:
        bos = None
    bos_in_text = bos_id is not None and tokenizer("x")["input_ids"][:1] == [bos_id]
    bos_in_chat, end = bos_in_text, None
    rendered = _probe(tokenizer)
    if rendered is not None:
        bos_in_chat = bool(bos) and rendered.startswith(bos)
        after = rendered[rendered.index(_PROBE_REPLY) + len(_PROBE_REPLY):].lstrip(" ")
        end = next((s for s in specials if after.startswith(s)), None) or after.split("\n", 1)[0].strip() or None
    if end is None:
        end = eos
    end_id = None
    if end is not None and end in specials:
        end_id = tokenizer.convert_tokens_to_ids(end)
    found = Markers(bos, bos_id, eos, eos_id, end, end_id, bos_in_text, bos_in_chat, tuple(specials))
    try:
        _markers[tokenizer] = (template, found)
    except TypeError:
        pass
    return found


def _probe(tokenizer) -> str | None:
    """The tokenizer's own template around a probe exchange, or None without a usable template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE_USER},
                                              {"role": "assistant", "content": _PROBE_REPLY}], tokenize=False)
    except Exception:  # templates raise anything from jinja errors to custom exceptions
        return None
    return text if isinstance(text, str) and _PROBE_REPLY in text else None


@dataclass
class Reading:
    """How one model reads the pivot-rendered text (see the module docstring)."""

    tokenizer: Any
    markers: Markers
    pivot_bos: str | None = None  # dropped from the front of the text
    replace: dict[str, str] = field(default_factory=dict)  # pivot marker → this model's
    counterparts: dict[int, int] = field(default_factory=dict)  # this model's special ids → the pivot's

    def uses_bos(self, chat: bool) -> bool:
        m = self.markers
        return m.bos_id is not None and (m.bos_in_chat if chat else m.bos_in_text)


def pivot_reading(tokenizer) -> Reading:
    m = markers(tokenizer)
    return Reading(tokenizer, m, pivot_bos=m.bos)


def source_reading(tokenizer, pivot_tokenizer) -> Reading:
    """The source reads the pivot's markers as its own; its special ids map to the pivot's."""
    s, p = markers(tokenizer), markers(pivot_tokenizer)
    replace: dict[str, str] = {}
    if p.end_of_turn and s.end_of_turn:
        replace[p.end_of_turn] = s.end_of_turn
    if p.eos and s.eos and p.eos not in replace:
        replace[p.eos] = s.eos
    replace = {a: b for a, b in replace.items() if a != b}
    counterparts = {}
    for mine, theirs in ((s.bos_id, p.bos_id), (s.eos_id, p.eos_id), (s.end_of_turn_id, p.end_of_turn_id)):
        if mine is not None and theirs is not None:
            counterparts[int(mine)] = int(theirs)
    return Reading(tokenizer, s, pivot_bos=p.bos, replace=replace, counterparts=counterparts)


def read(reading: Reading, text: str, spans: list[tuple[int, int]], chat: bool, max_length: int):
    """Token ids, whether each is a response token, and each token's [start, end) characters in
    the pivot text ``text`` (a substituted marker covers the pivot marker's characters; the
    model's own BOS covers the pivot's, or none).

    In a conversation the model's BOS is written as text in front, as its own chat template
    writes it; in plain text it is put in front as an id, as its tokenizer does. Either way the
    rest is tokenized exactly as the model's own template path would tokenize it.
    """
    start = len(reading.pivot_bos) if reading.pivot_bos and text.startswith(reading.pivot_bos) else 0
    bos = reading.markers.bos if reading.uses_bos(chat) else None
    as_text = bool(bos) and chat
    if start == 0 and not reading.replace and not as_text:
        mine, segments = text, None
    else:
        mine, segments = _substitute(text, start, reading.replace, bos if as_text else "")
    as_id = bos is not None and not as_text
    limit = max(1, max_length - (1 if as_id else 0))
    enc = reading.tokenizer(mine, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                            max_length=limit)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    if segments is not None:
        offsets = _to_pivot(offsets, segments)
    if as_id:
        ids = np.concatenate([[reading.markers.bos_id], ids]).astype(np.int64)
        offsets = np.vstack([[[0, start]], offsets]).astype(np.int64)
    response = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        response |= (offsets[:, 1] > offsets[:, 0]) & (offsets[:, 0] >= a) & (offsets[:, 0] < b)
    return ids, response, offsets


def _substitute(text: str, start: int, replace: dict[str, str], prefix: str = ""):
    """``prefix`` + ``text[start:]`` with every ``replace`` key swapped for its value, and the
    segments (new_start, new_end, old_start, old_end, copied) that map the new text back (the
    prefix stands for ``text[:start]``)."""
    pieces, segments = [prefix], []
    if prefix:
        segments.append((0, len(prefix), 0, start, False))
    pos, new = start, len(prefix)
    matches = re.finditer("|".join(map(re.escape, sorted(replace, key=len, reverse=True))), text) if replace else ()
    for m in matches:
        if m.start() < start:
            continue
        if m.start() > pos:
            pieces.append(text[pos:m.start()])
            segments.append((new, new + m.start() - pos, pos, m.start(), True))
            new += m.start() - pos
        value = replace[m.group()]
        pieces.append(value)
        segments.append((new, new + len(value), m.start(), m.end(), False))
        new += len(value)
        pos = m.end()
    if pos < len(text) or not segments:
        pieces.append(text[pos:])
        segments.append((new, new + len(text) - pos, pos, len(text), True))
    return "".join(pieces), np.array(segments, dtype=np.int64)


def _to_pivot(offsets: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Offsets in the substituted text → offsets in the pivot text: copied characters shift, a
    character of a substituted marker stands for the whole pivot marker."""
    seg = segments[segments[:, 1] > segments[:, 0]]  # an empty replacement holds no characters
    if len(seg) == 0:
        return np.zeros_like(offsets)
    out = np.empty_like(offsets)
    for col, side in ((0, "right"), (1, "left")):
        pos = offsets[:, col]
        # a start belongs to the segment it begins in, an end to the segment it closes
        i = np.searchsorted(seg[:, 0] if col == 0 else seg[:, 1], pos, side=side)
        i = np.clip(i - 1 if col == 0 else i, 0, len(seg) - 1)
        na, nb, oa, ob, copied = (seg[i, c] for c in range(5))
        linear = oa + (pos - na)
        out[:, col] = np.where(copied.astype(bool), linear, oa if col == 0 else ob)
    return out
