"""The output vocabulary of a config with a tokenizer key, and the embedding rows it asks for.

The output tokenizer is the base model's (``base``; without a base model, the first model the
config names), a model's own (``<model>``), or the ``union``: the base's, then the regular
tokens of the other models it lacks, then every model's added and special tokens, then the
``tokenizer.tokens`` keys still missing. Token ids ≥ a model's ``vocab_size`` are not part of
its vocabulary.

Each model feeding an embedding or ``lm_head`` is given one row per output token before the
strategy merges them: its own row for a token it has (unless the token is ``force``d);
otherwise the token's ``tokenizer.tokens`` entry, else the row of the only feeding model that
has it, zeros if none has it, the base model's row if it is among them and has it, else the
mean of the rows of the models that have it. Rows padding the vocabulary to
``pad_to_multiple_of`` are each model's mean row. This is mergekit's construction; its order of
the union's new regular tokens follows a hash, fusion's the models' order and their token ids.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .api.errors import FusionError, MergeError
from .api.modelfiles import is_tokenizer_file, support_files
from .checkpoint import TensorInfo
from .config_tokenizer import bundled_templates, is_template_text
from .models import Model, ModelSet
from .writer import copy_support_files

if TYPE_CHECKING:
    from .planner import Plan

#: Output rows gathered per step, so that a large embedding is not copied whole per model.
STEP = 8192


def _auto_tokenizer() -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise FusionError("the config's tokenizer keys need transformers, which is not installed: "
                          "pip install transformers (or model-fusion[fuse])") from None
    return AutoTokenizer


def load_tokenizer(model: Model) -> Any | None:
    """The model's tokenizer (never with remote code), or None when its folder has none."""
    if not any(is_tokenizer_file(f) for f in support_files(model.folder, model.label)):
        return None
    AutoTokenizer = _auto_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(str(model.folder), trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # a broken or unsupported tokenizer is the user's to fix
        raise MergeError(f"{model.label}: its tokenizer cannot be loaded ({type(exc).__name__}: {exc}); "
                         f"fix its tokenizer files or remove the tokenizer keys from the config") from None


def _vocab_size(model: Model, tokenizer: Any) -> int:
    size = model.spec.setting(model.checkpoint.config, "vocab_size")
    return size if isinstance(size, int) and size > 0 else len(tokenizer)


def _without_unused(model: Model, tokenizer: Any) -> Any:
    """The tokenizer without the added tokens whose ids are past the model's vocab_size (they
    have no embedding row)."""
    size = _vocab_size(model, tokenizer)
    unused = {t for t, i in tokenizer.get_vocab().items() if i >= size}
    if not unused:
        return tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = Path(tmp) / "tokenizer.json", Path(tmp) / "tokenizer_config.json"
        data, settings = (json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {} for f in files)
        if unused - {t["content"] for t in data.get("added_tokens", ())}:
            raise MergeError(f"{model.label}: its tokenizer has regular tokens with ids past its vocab_size {size}; "
                             f"such a tokenizer cannot be the base of a tokenizer merge")
        data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < size]
        settings["added_tokens_decoder"] = {i: t for i, t in settings.get("added_tokens_decoder", {}).items()
                                            if int(i) < size}
        for key in ("additional_special_tokens", "extra_special_tokens"):
            if isinstance(settings.get(key), list):
                settings[key] = [t for t in settings[key] if (t if isinstance(t, str) else t.get("content")) not in unused]
        for f, content in zip(files, (data, settings)):
            f.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
        return _auto_tokenizer().from_pretrained(tmp, trust_remote_code=False, local_files_only=True)


def _copy(tokenizer: Any) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return _auto_tokenizer().from_pretrained(tmp, trust_remote_code=False, local_files_only=True)


def _union(base: Any, tokenizers: Sequence[tuple[Any, int]]) -> Any:
    """The base tokenizer plus the others' regular tokens it lacks, then every added token."""
    out = _copy(base)
    have = set(base.get_vocab())
    added: dict[str, Any] = {}
    regular: dict[str, None] = {}
    for tok, size in tokenizers:
        decoder = tok.added_tokens_decoder
        contents = {a.content for a in decoder.values()}
        for token, i in sorted(tok.get_vocab().items(), key=lambda item: item[1]):
            if i < size and token not in contents:
                regular.setdefault(token)
        for i, info in decoder.items():
            if i < size:
                added.setdefault(info.content, info)
    for token in regular:
        if token not in have and token not in added:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class RowMap:
    """Where each output row of one vocabulary tensor comes from, for each merge source."""

    own: list[list[int]]  # per source: its row of each output token, -1 where it takes the default
    defaults: dict[int, tuple]  # output row → ("zero",) | ("row", source, row) | ("mean", ((source, row), ...))
    tokens: int  # rows of real tokens; those after pad the vocabulary
    size: int
    _cache: dict = field(default_factory=dict, repr=False)

    def _default(self, o: int, views: Sequence[Any]) -> Any:
        import torch

        if o not in self._cache:
            spec = self.defaults.get(o, ("zero",))
            width = views[0].shape[1:]
            if spec[0] == "row":
                self._cache[o] = views[spec[1]][spec[2]].to(torch.float32)
            elif spec[0] == "mean":
                self._cache[o] = sum(views[j][r].to(torch.float32) for j, r in spec[1]) / len(spec[1])
            else:
                self._cache[o] = torch.zeros(width, dtype=torch.float32)
        return self._cache[o]

    def _rows(self, j: int, views: Sequence[Any], start: int, stop: int) -> Any:
        import torch

        index = torch.tensor(self.own[j][start:stop], dtype=torch.long)
        have = index >= 0
        rows = torch.empty((stop - start, *views[j].shape[1:]), dtype=torch.float32)
        rows[have] = views[j][index[have]].to(torch.float32)
        for o in (~have).nonzero().flatten().tolist():
            rows[o] = self._default(start + o, views)
        return rows

    def gather(self, views: Sequence[Any], rows: slice) -> list[Any]:
        """Float32 copies of output rows ``rows`` of every source (``views``: their tensors)."""
        import torch

        start, stop = rows.start or 0, rows.stop if rows.stop is not None else self.size
        out = []
        for j, view in enumerate(views):
            real = self._rows(j, views, start, min(stop, self.tokens)) if start < self.tokens else None
            if stop > self.tokens:
                pad = self._pad_mean(j, views).expand(stop - max(start, self.tokens), *view.shape[1:])
                real = pad.clone() if real is None else torch.cat([real, pad])
            out.append(real)
        return out

    def _pad_mean(self, j: int, views: Sequence[Any]) -> Any:
        key = ("pad", j)
        if key not in self._cache:
            total = sum(self._rows(j, views, a, min(a + STEP, self.tokens)).sum(0)
                        for a in range(0, self.tokens, STEP))
            self._cache[key] = total / self.tokens
        return self._cache[key]


@dataclass
class Vocabulary:
    tokenizer: Any  # the transformers tokenizer written to the output
    tokens: dict[str, int]  # output token → id (0..n-1)
    size: int  # rows, padding included
    vocabs: dict[int, dict[str, int]]  # id(model) → its token → row, for every model read
    originals: dict[int, dict[str, int]]  # id(model) → its tokenizer's whole vocabulary
    base: Model | None
    entries: dict  # token → its TokenEntry
    entry_models: dict[str, Model]  # a token entry's path → the model it names
    note: str = ""

    def rows(self, name: str, models: list[Model], infos: list[TensorInfo]) -> RowMap:
        """The rows of tensor ``name`` for each of its merge sources (``models``, merge order)."""
        n = len(self.tokens)
        limits = [info.shape[0] for info in infos]
        vocabs = [{t: r for t, r in self.vocabs[id(m)].items() if r < limit} for m, limit in zip(models, limits)]
        forced = {t for t, e in self.entries.items() if e.force}
        own = [[-1] * n for _ in models]
        defaults: dict[int, tuple] = {}
        for token, o in self.tokens.items():
            present = [j for j, v in enumerate(vocabs) if token in v]
            for j in present:
                if token not in forced:
                    own[j][o] = vocabs[j][token]
            if len(present) == len(models) and token not in forced:
                continue
            entry = self.entries.get(token)
            if entry is not None:
                defaults[o] = self._entry_row(entry, token, name, models, vocabs, limits)
            elif len(present) == 1:
                defaults[o] = ("row", present[0], vocabs[present[0]][token])
            elif not present:
                defaults[o] = ("zero",)
            elif any(m is self.base and token in vocabs[j] for j, m in enumerate(models)):
                j = next(j for j, m in enumerate(models) if m is self.base)
                defaults[o] = ("row", j, vocabs[j][token])
            else:
                defaults[o] = ("mean", tuple((j, vocabs[j][token]) for j in present))
        return RowMap(own, defaults, n, self.size)

    def _entry_row(self, entry: Any, token: str, name: str, models: list[Model], vocabs: list,
                   limits: list[int]) -> tuple:
        if entry.kind == "zero":
            return ("zero",)
        source = self.entry_models[entry.path]
        j = next((j for j, m in enumerate(models) if m is source), None)
        if j is None:
            raise MergeError(f"{entry.path}.source: {source.label} is not one of the models merged into {name}, "
                             f"so its row of {token!r} cannot be taken; name one of them")
        if entry.kind == "model":
            if token not in vocabs[j]:
                raise MergeError(f"{entry.path}.source: {source.label} has no token {token!r}; name a model that "
                                 f"has it, or use `{{kind: model_token, ...}}` or `{{kind: zero}}`")
            return ("row", j, vocabs[j][token])
        row = entry.token_id if entry.token is None else self.originals[id(source)].get(entry.token)
        if row is None or not 0 <= row < limits[j]:
            what = f"token {entry.token!r}" if entry.token is not None else f"a row {row}"
            raise MergeError(f"{entry.path}.source: {source.label} has no {what} in {name}")
        return ("row", j, row)


def build_vocabulary(plan: Plan, opened: ModelSet) -> Vocabulary:
    """The output tokenizer and every merged model's vocabulary (see the module docstring)."""
    config, spec = plan.config, plan.config.tokenizer
    read = [opened.open(r, "") for r in config.references]
    first = plan.base or read[0]
    tokenizers: dict[int, Any] = {}
    for m in [first] + read:
        if id(m) not in tokenizers:
            tokenizers[id(m)] = load_tokenizer(m)
    if tokenizers[id(first)] is None:
        raise MergeError(f"{spec.path}: {first.label} has no tokenizer files, so the output tokenizer cannot be "
                         f"built from it; remove the tokenizer keys or give that model its tokenizer")
    base_tok = _without_unused(first, tokenizers[id(first)])
    tokenizers[id(first)] = base_tok
    for m in read:
        if tokenizers[id(m)] is None:
            plan.notices.append(f"{m.label} has no tokenizer: its vocabulary is taken to be {first.label}'s")
    models = list({id(m): m for m in [first] + read}.values())
    if spec.source == "base":
        out = _copy(base_tok)
    elif spec.source == "union":
        out = _union(base_tok, [(tokenizers[id(m)], _vocab_size(m, tokenizers[id(m)])) for m in models
                                if tokenizers[id(m)] is not None])
    else:
        source = opened.open(spec.source, spec.path)
        plan.also_read.append(source)
        found = load_tokenizer(source)
        if found is None:
            raise MergeError(f"{spec.path}: {source.label} has no tokenizer files to take the output tokenizer from")
        out = _copy(found)
    present = set(out.get_vocab())
    for token in spec.tokens:
        if token not in present:
            out.add_tokens(token)
            present.add(token)
    tokens = out.get_vocab()
    n = len(tokens)
    if sorted(tokens.values()) != list(range(n)):
        raise MergeError(f"{spec.path}: the output tokenizer's token ids are not 0..{n - 1} without gaps, so they "
                         f"cannot index embedding rows")
    pad = spec.pad_to_multiple_of
    size = -(-n // pad) * pad if pad else n
    what = spec.source if spec.source in ("base", "union") else "the tokenizer of " + spec.source
    note = f"vocabulary: {n} tokens ({what})" + (f", padded to {size} rows" if size > n else "")
    entry_models = {e.path: opened.open(e.model, f"{e.path}.source") for e in spec.tokens.values() if e.model}
    # every model read, and the models token entries take rows from, with the tokenizer of its rows
    readers = {id(m): (m, tokenizers[id(m)] or base_tok) for m in models}
    for m in entry_models.values():
        if id(m) not in readers:
            readers[id(m)] = (m, load_tokenizer(m) or base_tok)
    vocabs: dict[int, dict[str, int]] = {}
    originals: dict[int, dict[str, int]] = {}
    for key, (m, tok) in readers.items():
        originals[key] = tok.get_vocab()
        limit = _vocab_size(m, tok)
        vocabs[key] = {t: i for t, i in originals[key].items() if i < limit}
    return Vocabulary(out, tokens, size, vocabs, originals, plan.base, dict(spec.tokens), entry_models, note)


def chat_template(plan: Plan) -> str | None:
    """The chat template the config asks for; None: keep the tokenizer's own."""
    value = plan.config.chat_template
    if value is None:
        return None
    if value == "auto":  # the template most of the models have; the first of them on a tie
        found = []
        for m in [m for m in plan.inputs if m not in plan.also_read]:
            tok = load_tokenizer(m)
            template = getattr(tok, "chat_template", None) if tok is not None else None
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                found.append(template.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    return value if is_template_text(value) else bundled_templates()[value]


def write_tokenizer(plan: Plan, folder: Path) -> None:
    """The files beside the weights: the layout model's, with the tokenizer the config builds (or
    the layout's given the config's chat template) written in place of its tokenizer files."""
    rebuilt = plan.vocabulary is not None or plan.config.chat_template is not None
    layout = plan.layout
    exclude = ["config.json"] + ([f for f in support_files(layout.folder, layout.label) if is_tokenizer_file(f)]
                                 if rebuilt else [])
    copy_support_files(layout.folder, folder, exclude=exclude, label=layout.label)
    if not rebuilt:
        return
    tokenizer = plan.vocabulary.tokenizer if plan.vocabulary is not None else load_tokenizer(plan.layout)
    if tokenizer is None:
        return  # said by the plan: there is no tokenizer to give the template to
    template = chat_template(plan)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))
