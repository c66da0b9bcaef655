"""The merge config: mergekit-compatible YAML, validated with errors that name the config path.

Parameter values take three forms, at any level where a parameter can be set:
- a scalar: ``density: 0.5``;
- a gradient: ``weight: [0.2, 0.8]``, interpolated piecewise-linearly over the layer position
  t ∈ [0, 1] (layer i of L has t = i/(L−1); embeddings t = 0; final norm and lm_head t = 1);
- a filter list: ``[{filter: mlp, value: 0.3}, {value: 0.5}]``: the first entry whose filter is
  a substring of the tensor's name (output or canonical) applies; an entry without a filter is
  the default and must come last.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .api.architecture import PARTS
from .api.dtypes import output_dtype
from .api.errors import ConfigError
from .api.params import Param
from .api.strategy import Strategy

TOP_LEVEL_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "layout_from",
                  "merge_parts", "carry_unmatched")
UNSUPPORTED = {
    "slices": "slices are not supported; list whole models under `models`",
    "tokenizer_source": "tokenizer_source is not supported; the tokenizer is copied from the layout model "
                        "(set `layout_from` to choose it)",
    "tokenizer": "tokenizer is not supported; the tokenizer is copied from the layout model "
                 "(set `layout_from` to choose it)",
    "chat_template": "chat_template is not supported; the chat template is copied from the layout model",
}
@dataclass
class ModelEntry:
    reference: str
    parameters: dict[str, Any]
    path: str  # config path of the entry, e.g. "models[1]"


@dataclass
class MergeConfig:
    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None  # safetensors dtype code (BF16, F16, F32)
    layout_from: str | None = None
    #: parts merged (language_model, vision_tower, projector); None: the architecture's defaults
    merge_parts: tuple[str, ...] | None = None
    #: carry layout-model tensors that another model lacks instead of failing
    carry_unmatched: bool = False
    source: Path | None = None
    text: str = ""
    lines: dict[str, int] = field(default_factory=dict)

    def line(self, path: str) -> int | None:
        return self.lines.get(path)

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(path, message, self.line(path))

    @property
    def base_dir(self) -> Path:
        return self.source.resolve().parent if self.source else Path.cwd()


def _line_map(node: Any, prefix: str, out: dict[str, int]) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = f"{prefix}.{key.value}" if prefix else str(key.value)
            out[path] = key.start_mark.line + 1
            _line_map(value, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}[{i}]"
            out[path] = item.start_mark.line + 1
            _line_map(item, path, out)


def _loader_class():
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML 1.2 floats: PyYAML (YAML 1.1) reads `5e-1` as a string, mergekit's configs don't."""

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


def parse_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    import yaml

    loader = _loader_class()(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("", f"{source}: YAML syntax error{where}: {problem}; fix the YAML and retry") from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    if node is not None:
        _line_map(node, "", lines)
    return data, lines


def load_config(path: str | Path) -> MergeConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("", f"config file {str(path)!r} does not exist; check the path") from None
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    return parse_config(text, source=path)


def model_reference(value: Any, path: str, lines: Mapping[str, int]) -> str:
    """A model named in a config: a local path or a Hub name, stripped; else a ConfigError."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f"must be a model path or Hub name (org/name[@revision]), not {value!r}",
                          lines.get(path))
    return value.strip()


def parse_config(text: str, source: Path | None = None) -> MergeConfig:
    data, lines = parse_yaml(text, str(source or "config"))

    def err(p: str, message: str) -> ConfigError:
        return ConfigError(p, message, lines.get(p))

    if not isinstance(data, Mapping):
        raise ConfigError("", f"{source or 'config'}: the config must be a YAML mapping with "
                              f"merge_method and models; see README.md for an example")
    for key in data:
        if key in UNSUPPORTED:
            raise err(str(key), UNSUPPORTED[key])
        if key not in TOP_LEVEL_KEYS:
            raise err(str(key), f"unknown key; allowed keys: {', '.join(TOP_LEVEL_KEYS)}")
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        raise err("merge_method", "merge_method is required (e.g. merge_method: task_arithmetic)")

    def reference(p: str, value: Any, required: bool = False) -> str | None:
        return None if value is None and not required else model_reference(value, p, lines)

    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise err("models", "models must be a non-empty list of entries like `- model: ./my-finetune`")
    models = []
    for i, entry in enumerate(raw_models):
        p = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise err(p, "each entry needs a `model:` (a path or Hub name) and optional `parameters:`")
        for key in entry:
            if key not in ("model", "parameters"):
                raise err(f"{p}.{key}", "unknown key; a model entry has `model` and `parameters`")
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise err(f"{p}.parameters", "parameters must be a mapping such as {weight: 0.5}")
        models.append(ModelEntry(reference(f"{p}.model", entry["model"], True), dict(params), p))
    params = data.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise err("parameters", "parameters must be a mapping such as {lambda: 1.0}")

    def dtype(key: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        found = output_dtype(value)
        if found is None:
            raise err(key, f"unknown dtype {value!r}; use float32, float16 or bfloat16")
        return found.code

    merge_parts = data.get("merge_parts")
    if merge_parts is not None:
        if isinstance(merge_parts, str):
            merge_parts = [merge_parts]
        if not isinstance(merge_parts, list) or not merge_parts:
            raise err("merge_parts", f"merge_parts is a list of parts to merge, from: {', '.join(PARTS)}")
        for i, part in enumerate(merge_parts):
            if part not in PARTS:
                raise err(f"merge_parts[{i}]", f"unknown part {part!r}; the parts are {', '.join(PARTS)}")
        merge_parts = tuple(dict.fromkeys(merge_parts))
    carry_unmatched = data.get("carry_unmatched", False)
    if not isinstance(carry_unmatched, bool):
        raise err("carry_unmatched", f"carry_unmatched is true or false, not {carry_unmatched!r}")

    return MergeConfig(
        merge_method=method,
        models=models,
        base_model=reference("base_model", data.get("base_model")),
        parameters=dict(params),
        dtype=dtype("dtype"),
        out_dtype=dtype("out_dtype"),
        layout_from=reference("layout_from", data.get("layout_from")),
        merge_parts=merge_parts,
        carry_unmatched=carry_unmatched,
        source=source,
        text=text,
        lines=lines,
    )


# -- parameter values ------------------------------------------------------------------------

def _check_value(param: Param, value: Any, path: str, lines: Mapping[str, int], nested: bool = False) -> None:
    """Validate every leaf of a scalar / gradient / filter-list value."""
    line = lines.get(path)
    if isinstance(value, list):
        if not value:
            raise ConfigError(path, f"{param.name} is an empty list; give a value, a gradient or a filter list", line)
        if all(isinstance(v, Mapping) for v in value):
            if nested:
                raise ConfigError(path, "filter lists cannot be nested", line)
            for i, entry in enumerate(value):
                p = f"{path}[{i}]"
                extra = set(entry) - {"filter", "value"}
                if extra or "value" not in entry:
                    raise ConfigError(p, "a filter entry is {filter: <substring>, value: <value>}; "
                                         "the last entry may omit filter", lines.get(p))
                if "filter" not in entry and i != len(value) - 1:
                    raise ConfigError(p, "only the last entry may omit `filter` (it is the default)", lines.get(p))
                if "filter" in entry and not isinstance(entry["filter"], str):
                    raise ConfigError(f"{p}.filter", "a filter is a substring of tensor names", lines.get(p))
                _check_value(param, entry["value"], f"{p}.value", lines, nested=True)
            return
        if param.type not in (int, float):
            raise ConfigError(path, f"{param.name} is not a number, so it cannot be a gradient list", line)
        for i, v in enumerate(value):
            param.check(v, f"{path}[{i}]", lines.get(f"{path}[{i}]", line))
        return
    param.check(value, path, line)


def check_parameters(config: MergeConfig, strategy: Strategy) -> None:
    """Every parameter in the config is declared by the strategy and every value is valid."""
    names = ", ".join(p.name for p in strategy.parameters) or "none"
    for key, value in config.parameters.items():
        path = f"parameters.{key}"
        param = strategy.param(key)
        if param is None:
            raise config.error(path, f"unknown parameter {key!r} for {strategy.name}; its parameters are: {names}")
        _check_value(param, value, path, config.lines)
    for entry in config.models:
        for key, value in entry.parameters.items():
            path = f"{entry.path}.parameters.{key}"
            param = strategy.param(key)
            if param is None:
                raise config.error(path, f"unknown parameter {key!r} for {strategy.name}; its parameters are: {names}")
            if not param.per_model:
                raise config.error(path, f"{key} is a global parameter of {strategy.name}; "
                                         f"set it under the top-level `parameters`")
            _check_value(param, value, path, config.lines)


def evaluate(value: Any, names: tuple[str, ...], t: float) -> Any:
    """The value of a parameter for one tensor (``names``: its output and canonical names)."""
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for entry in value:
            if "filter" not in entry or any(entry["filter"] in n for n in names):
                return evaluate(entry["value"], names, t)
        return None  # no filter matched and no default: the next level decides
    if isinstance(value, list):
        if len(value) == 1:
            return value[0]
        x = min(max(t, 0.0), 1.0) * (len(value) - 1)
        i = min(int(x), len(value) - 2)
        frac = x - i
        return value[i] * (1 - frac) + value[i + 1] * frac
    return value


def resolve_parameters(config: MergeConfig, strategy: Strategy, model_entries: list[ModelEntry],
                       names: tuple[str, ...], t: float) -> dict[str, Any]:
    """Per-tensor parameters: per-model values as lists, global ones as scalars.

    A per-model value comes from the model entry, then the top-level ``parameters``, then the
    declared default; a filter list with no match falls through to the next level.
    """
    out: dict[str, Any] = {}
    for param in strategy.parameters:
        fallback = evaluate(config.parameters.get(param.name), names, t)
        if fallback is None:
            fallback = param.default
        if param.per_model:
            values = []
            for entry in model_entries:
                v = evaluate(entry.parameters.get(param.name), names, t)
                values.append(fallback if v is None else v)
            out[param.name] = [param.type(v) if v is not None else v for v in values]
        else:
            out[param.name] = param.type(fallback) if fallback is not None else None
    return out
