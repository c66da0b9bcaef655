"""The tokenizer part of a merge config: ``tokenizer_source``, the ``tokenizer:`` block and
``chat_template``, with mergekit's meaning.

- ``tokenizer_source: base | union | <model>`` (or ``tokenizer: {source: ...}``, whose source
  defaults to ``union``): the output vocabulary is the base model's, the union of every model's,
  or that model's; embedding and ``lm_head`` rows follow it (see :mod:`fusion.vocabulary`).
- ``tokenizer.tokens``: how the row of a token is made for models that lack it (or for every
  model, with ``force: true``): the row of that token in a named model, the row of another token
  (``{kind: model_token, model, token | token_id}``), or zeros (``{kind: zero}``).
- ``tokenizer.pad_to_multiple_of``: the vocabulary is padded to a multiple of it.
- ``chat_template``: ``auto`` (the template most of the models use), a bundled template's name,
  or a Jinja template itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Mapping

from .configfile import Problems

TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")
SOURCES = ("base", "union")


@dataclass
class TokenEntry:
    """How one token's row is made where a model lacks it (``force``: for every model)."""

    kind: str  # "model" (the token's row in ``model``), "model_token" (another token's row), "zero"
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False
    path: str = ""


@dataclass
class TokenizerEntry:
    source: str  # "base", "union" or a model reference
    tokens: dict[str, TokenEntry] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    path: str = "tokenizer"

    @property
    def source_model(self) -> str | None:
        return None if self.source in SOURCES else self.source


def bundled_templates() -> dict[str, str]:
    """Chat templates shipped with fusion, by name (``chatml``, ``llama3``, ...)."""
    folder = resources.files("fusion.registry") / "chat_templates"
    return {entry.name.removesuffix(".jinja"): entry.read_text(encoding="utf-8")
            for entry in folder.iterdir() if entry.name.endswith(".jinja")}


def is_template_text(value: str) -> bool:
    """A chat template written out (rather than named): Jinja, at least 20 characters."""
    return "{" in value and len(value) >= 20


def _source(value: Any, path: str, reference: Callable) -> str | None:
    if isinstance(value, str) and value.strip() in SOURCES:
        return value.strip()
    return reference(path, value, True)


def _token(name: str, raw: Any, path: str, problems: Problems, reference: Callable) -> TokenEntry | None:
    if not isinstance(raw, Mapping):
        problems.add(path, "a token entry is a mapping such as `{source: ./chatml-model, force: false}`")
        return None
    problems.known_keys(raw, TOKEN_KEYS, path, "a token entry has")
    force = raw.get("force", False)
    if not isinstance(force, bool):
        problems.add(f"{path}.force", f"force is true or false, not {force!r}")
    source = raw.get("source")
    p = f"{path}.source"
    if source is None:
        problems.add(path, f"the entry of {name!r} needs `source:` (a model, `{{kind: zero}}` or "
                           f"`{{kind: model_token, model: ..., token: ...}}`)")
        return None
    if not isinstance(source, Mapping):
        model = reference(p, source, True)
        return TokenEntry("model", model, force=force is True, path=path) if model else None
    kind = source.get("kind")
    if kind == "zero":
        problems.known_keys(source, ("kind",), p, "a zero source has")
        return TokenEntry("zero", force=force is True, path=path)
    if kind != "model_token":
        problems.add(f"{p}.kind", f"a token source kind is `zero` or `model_token`, not {kind!r}")
        return None
    problems.known_keys(source, ("kind", "model", "token", "token_id"), p, "a model_token source has")
    model = reference(f"{p}.model", source.get("model"), True)
    token, token_id = source.get("token"), source.get("token_id")
    if (token is None) == (token_id is None):
        problems.add(p, f"a model_token source names exactly one of `token` or `token_id` (for {name!r})")
        return None
    if token is not None and not isinstance(token, str):
        problems.add(f"{p}.token", f"token is the text of a token, not {token!r}")
        return None
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        problems.add(f"{p}.token_id", f"token_id is a token's number (0 or more), not {token_id!r}")
        return None
    return TokenEntry("model_token", model, token, token_id, force is True, path) if model else None


def parse_tokenizer(data: Mapping, problems: Problems, reference: Callable) -> TokenizerEntry | None:
    """The output tokenizer a config asks for (None: the layout model's, as it is)."""
    legacy, block = data.get("tokenizer_source"), data.get("tokenizer")
    if legacy is not None and block is not None:
        problems.add("tokenizer", "give either `tokenizer_source` or the `tokenizer:` block, not both")
        return None
    if legacy is not None:
        source = _source(legacy, "tokenizer_source", reference)
        return TokenizerEntry(source, path="tokenizer_source") if source else None
    if block is None and "tokenizer" not in data:
        return None
    block = problems.mapping(block, "tokenizer", "{source: union}")
    problems.known_keys(block, TOKENIZER_KEYS, "tokenizer", "the tokenizer block has")
    source = _source(block.get("source", "union"), "tokenizer.source", reference)
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        problems.add("tokenizer.pad_to_multiple_of", f"pad_to_multiple_of is a whole number of 1 or more, not {pad!r}")
        pad = None
    tokens = {}
    raw_tokens = problems.mapping(block.get("tokens"), "tokenizer.tokens", "{'<|im_start|>': {source: ./chatml}}")
    for name, raw in raw_tokens.items():
        entry = _token(str(name), raw, f"tokenizer.tokens.{name}", problems, reference)
        if entry is not None:
            tokens[str(name)] = entry
    return TokenizerEntry(source, tokens, pad, "tokenizer") if source else None


def parse_chat_template(value: Any, problems: Problems) -> str | None:
    """``auto``, a bundled template's name or a template; None when not set."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        problems.add("chat_template", f"chat_template is `auto`, a template name or a Jinja template, not {value!r}")
        return None
    if value == "auto" or is_template_text(value):
        return value
    names = bundled_templates()
    if value.strip() not in names:
        problems.add("chat_template", f"unknown chat template {value!r}; use `auto` (the template most of the "
                                      f"models have), one of {', '.join(sorted(names))}, or a Jinja template")
        return None
    return value.strip()
