"""The merge config: mergekit-compatible YAML (or the same data as a mapping), validated with
errors that name the config path; every problem of a config is reported in one run.

Parameter values take three forms, at any level where a parameter can be set (see
:mod:`fusion.parameters` for how they resolve per tensor):
- a scalar: ``density: 0.5``;
- a gradient: ``weight: [0.2, 0.8]``, interpolated piecewise-linearly over the layers;
- a filter list: ``[{filter: mlp, value: 0.3}, {value: 0.5}]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .api.architecture import PARTS
from .api.dtypes import output_dtype
from .api.errors import ConfigError
from .config_slices import SliceEntry, parse_layered
from .config_tokenizer import TokenizerEntry, parse_chat_template, parse_tokenizer
from .configfile import Document, Problems, model_reference, parse_document, read_document
from .host import parameter_owners, strategies

TOP_LEVEL_KEYS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype",
                  "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "name", "layout_from",
                  "merge_parts", "carry_unmatched", "random_seed")
#: Keys published configs put at the top level that belong elsewhere (mergekit ignores them there).
MISPLACED = {
    "pad_to_multiple_of": "pad_to_multiple_of belongs in the tokenizer block: `tokenizer: {pad_to_multiple_of: 8}` "
                          "(mergekit ignores it here, so its merges were not padded)",
}


@dataclass
class ModelEntry:
    reference: str
    parameters: dict[str, Any]
    path: str  # config path of the entry, e.g. "models[1]"


@dataclass
class MergeConfig:
    merge_method: str
    models: list[ModelEntry]  # a `models:` config; empty when it has `slices`
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # safetensors dtype code (BF16, F16, F32, F64)
    out_dtype: str | None = None
    #: output slices of a `slices:` (or `modules: {default: {slices: ...}}`) config; None: `models:`
    slices: list[SliceEntry] | None = None
    #: parameters of `modules.default`, between the slices' and the top-level ones
    module_parameters: dict[str, Any] = field(default_factory=dict)
    module_path: str = ""
    tokenizer: TokenizerEntry | None = None  # None: the layout model's tokenizer, as it is
    chat_template: str | None = None
    name: str | None = None
    #: things the config sets that are accepted but worth saying (settings without effect)
    notices: list[str] = field(default_factory=list)
    layout_from: str | None = None
    #: parts merged (language_model, vision_tower, projector); None: the architecture's defaults
    merge_parts: tuple[str, ...] | None = None
    #: carry layout-model tensors that another model lacks instead of failing
    carry_unmatched: bool = False
    #: seed of strategies that draw random numbers; None: one is drawn and reported
    random_seed: int | None = None
    source: Path | None = None
    text: str = ""
    lines: dict[str, int] = field(default_factory=dict)
    #: the folder relative model paths are taken from; default: the config file's, else the cwd
    folder: Path | None = None
    #: problems found while reading it, not raised yet (``check=False``): the planner adds the
    #: strategy's and reports them all together
    problems: list[ConfigError] = field(default_factory=list)

    @property
    def output_dtype(self) -> str | None:
        """The dtype merged tensors are written in: ``out_dtype``, else ``dtype`` (the math is
        float32 either way); None: each tensor's dtype in the layout model."""
        return self.out_dtype or self.dtype

    @property
    def references(self) -> list[str]:
        """Every model the merge reads, each once, in config order (base model first)."""
        refs = [self.base_model] if self.base_model else []
        refs += [m.reference for m in self.models]
        for s in self.slices or ():
            refs += ([s.base_model] if s.base_model else []) + [src.reference for src in s.sources]
        return list(dict.fromkeys(refs))

    def line(self, path: str) -> int | None:
        return self.lines.get(path)

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(path, message, self.line(path))

    @property
    def base_dir(self) -> Path:
        if self.folder is not None:
            return Path(self.folder)
        return self.source.resolve().parent if self.source else Path.cwd()

    def raise_problems(self) -> "MergeConfig":
        problems = Problems(self.lines)
        problems.errors = list(self.problems)
        problems.done()
        return self

    @classmethod
    def from_mapping(cls, data: Any, *, base_dir: str | Path | None = None, check: bool = True) -> "MergeConfig":
        """A config from data shaped like the YAML file (a dict, e.g. built in a notebook), with
        the same validation and messages; relative model paths are taken from ``base_dir``
        (default: the current folder). ``check=False`` keeps the problems found in
        :attr:`problems` instead of raising them."""
        import yaml

        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True) if isinstance(data, Mapping) else ""
        config = _from_document(Document(data, {}, None, text))
        config.folder = Path(base_dir) if base_dir is not None else None
        return config.raise_problems() if check else config


def load_config(path: str | Path, *, check: bool = True) -> MergeConfig:
    config = _from_document(read_document(path))
    return config.raise_problems() if check else config


def parse_config(text: str, source: Path | None = None, *, check: bool = True) -> MergeConfig:
    config = _from_document(parse_document(text, source))
    return config.raise_problems() if check else config


def _from_document(doc: Document) -> MergeConfig:
    data, lines = doc.data, doc.lines
    if not isinstance(data, Mapping):
        raise ConfigError("", f"{doc.name}: the config must be a YAML mapping with merge_method and models; "
                              f"see README.md for an example")
    problems = Problems(lines)
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        problems.add("merge_method", "merge_method is required (e.g. merge_method: task_arithmetic)")
    # the strategy is checked by the planner; here it only says where a misplaced key belongs
    known = strategies()
    strategy = known.get(method) if isinstance(method, str) else None
    declared = parameter_owners()
    hints = dict(MISPLACED)
    for key in data:
        if strategy is not None and strategy.param(str(key)) is not None:
            hints[key] = (f"{key} is a parameter of {strategy.name}: put it under `parameters:` (mergekit "
                          f"ignores it here, so its merges used the default)")
        elif key in declared:
            hints[key] = (f"{key} is a parameter of {declared[key]}"
                          + (f", not of {strategy.name}" if strategy else "") + ": remove it, or put it under "
                          "`parameters:` for a method that takes it (mergekit ignores it here)")
    problems.known_keys(data, TOP_LEVEL_KEYS, "", "allowed keys", hints)

    def reference(path: str, value: Any, required: bool = False) -> str | None:
        if value is None and not required:
            return None
        with problems.collect():
            return model_reference(value, path, lines)
        return None

    layered = parse_layered(data, problems, reference)
    models = []
    raw_models = layered.models if layered.slices is None else []
    if not isinstance(raw_models, list):
        problems.add(layered.models_path, "models must be a non-empty list of entries like `- model: ./my-finetune`")
        raw_models = []
    for i, entry in enumerate(raw_models):
        p = f"{layered.models_path}[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            problems.add(p, "each entry needs a `model:` (a path or Hub name) and optional `parameters:`")
            continue
        entry_hints = {k: f"{k} is a parameter: put it under `parameters:`" for k in entry if k in declared}
        problems.known_keys(entry, ("model", "parameters"), p, "a model entry has", entry_hints)
        params = problems.mapping(entry.get("parameters"), f"{p}.parameters", "{weight: 0.5}")
        ref = reference(f"{p}.model", entry["model"], True)
        if ref is not None:
            models.append(ModelEntry(ref, dict(params), p))
    params = problems.mapping(data.get("parameters"), "parameters", "{lambda: 1.0}")

    def dtype(key: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        found = output_dtype(value)
        if found is None:
            problems.add(key, f"unknown dtype {value!r}; use bfloat16, float16, float32 or float64")
            return None
        return found.code

    merge_parts = data.get("merge_parts")
    if merge_parts is not None:
        if isinstance(merge_parts, str):
            merge_parts = [merge_parts]
        if not isinstance(merge_parts, list) or not merge_parts:
            problems.add("merge_parts", f"merge_parts is a list of parts to merge, from: {', '.join(PARTS)}")
            merge_parts = []
        for i, part in enumerate(merge_parts):
            if part not in PARTS:
                problems.add(f"merge_parts[{i}]", f"unknown part {part!r}; the parts are {', '.join(PARTS)}")
        merge_parts = tuple(dict.fromkeys(p for p in merge_parts if p in PARTS)) or None
    carry_unmatched = data.get("carry_unmatched", False)
    if not isinstance(carry_unmatched, bool):
        problems.add("carry_unmatched", f"carry_unmatched is true or false, not {carry_unmatched!r}")
    seed = data.get("random_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        problems.add("random_seed", f"random_seed is a whole number from 0 to 2^64 - 1, not {seed!r}")
        seed = None
    name = data.get("name")
    if name is not None and not isinstance(name, (str, int, float)):
        problems.add("name", f"name is the merge's name (text), not {name!r}")

    config = MergeConfig(
        merge_method=method if isinstance(method, str) else "",
        models=models,
        base_model=reference("base_model", data.get("base_model")),
        parameters=dict(params),
        dtype=dtype("dtype"),
        out_dtype=dtype("out_dtype"),
        slices=layered.slices,
        module_parameters=layered.module_parameters,
        module_path=layered.module_path,
        tokenizer=parse_tokenizer(data, problems, reference),
        chat_template=parse_chat_template(data.get("chat_template"), problems),
        name=str(name).strip() if isinstance(name, (str, int, float)) else None,
        layout_from=reference("layout_from", data.get("layout_from")),
        merge_parts=merge_parts,
        carry_unmatched=carry_unmatched is True,
        random_seed=seed,
        source=doc.source,
        text=doc.text,
        lines=lines,
        problems=problems.errors,
    )
    config.notices = list(problems.notes)
    return config
