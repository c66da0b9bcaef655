"""The fuse config: parsed and validated with errors that name the config path and line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..api.dtypes import output_dtype
from ..api.errors import ConfigError
from ..configfile import Document, Problems, model_reference, parse_document, read_document

TOP_LEVEL_KEYS = ("pivot", "sources", "data", "eval_data", "representations", "alignment",
                  "fusion_function", "training", "merge")
#: SCE as FuseChat's released merge code runs it: the top-10% variance mask decides each
#: target's weight, and the unmasked task vectors are merged (`select_scope: weights`).
DEFAULT_SCE = {"select_topk": 0.1, "select_scope": "weights"}


@dataclass
class RepresentationSettings:
    top_k: int = 10
    max_length: int = 2048
    batch_size: int = 8
    chunk_size: int = 256  # sequences per chunk file: the unit of work, memory and resumption
    dtype: str = "auto"  # scoring dtype: the stored one on GPUs, float32 on CPU
    store_dtype: str = "float16"  # of the cached logits and target probabilities (FuseChat's)


@dataclass
class Training:
    lm_loss_weight: float = 0.9
    epochs: int = 3
    learning_rate: float = 5e-6
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    seed: int = 42
    dtype: str = "bfloat16"
    strategy: str = "auto"  # ddp | fsdp | auto (FSDP where a whole copy would not fit a GPU)
    gradient_checkpointing: bool = True
    packing: bool = True  # whole sequences back to back in rows of max_length tokens
    max_length: int | None = None  # tokens per packed row (default: representations.max_length)


@dataclass
class FuseConfig:
    pivot: str
    sources: list[str]
    data: Path
    eval_data: Path | None = None
    eval_fraction: float = 0.1
    representations: RepresentationSettings = field(default_factory=RepresentationSettings)
    alignment: str = "statistics"
    fallback: str = "gold"  # what an unaligned position learns from: "gold" (FuseChat) or "pivot"
    carry: str = "coarser"  # where the next tokens differ: only a coarser source's prediction, or "all"
    fusion_function: str = "min_ce"
    training: Training = field(default_factory=Training)
    merge_method: str = "sce"
    merge_parameters: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SCE))
    source: Path | None = None
    text: str = ""
    base_dir: Path = field(default_factory=Path.cwd)


def load_fuse_config(path: str | Path) -> FuseConfig:
    return _from_document(read_document(path))


def parse_fuse_config(text: str, source: Path | None = None) -> FuseConfig:
    return _from_document(parse_document(text, source))


def _number(value: Any, kind: type, path: str, lines: Mapping[str, int], *, minimum: float | None = None,
            maximum: float | None = None, positive: bool = False) -> Any:
    line = lines.get(path)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not float(value).is_integer()):
        raise ConfigError(path, f"must be {'an integer' if kind is int else 'a number'}, not {value!r}", line)
    value = kind(value)
    if positive and value <= 0:
        raise ConfigError(path, f"must be greater than 0, not {value!r}", line)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        raise ConfigError(path, f"{value!r} is out of range; it must be in [{minimum:g}, {maximum:g}]", line)
    return value


def _section(data: Mapping, key: str, cls: type, problems: Problems, checks: dict) -> Any:
    raw = problems.mapping(data.get(key), key, f"{{{next(iter(checks))}: ...}}")
    problems.known_keys(raw, tuple(checks), key)
    values = {}
    for name, value in raw.items():
        if name in checks:
            with problems.collect():
                values[name] = checks[name](value, f"{key}.{name}")
    return cls(**values)


def _from_document(doc: Document) -> FuseConfig:
    from ..host import alignments, fusion_functions, strategies

    data, lines = doc.data, doc.lines
    if not isinstance(data, Mapping):
        raise ConfigError("", f"{doc.name}: a fuse config is a YAML mapping with pivot, sources "
                              f"and data; see docs/fuse.md for an example")
    problems = Problems(lines)
    problems.known_keys(data, TOP_LEVEL_KEYS)

    def reference(value: Any, path: str) -> str | None:
        with problems.collect():
            return model_reference(value, path, lines)
        return None

    pivot = None
    if "pivot" not in data:
        problems.add("pivot", "pivot is required: the model every target starts from (a path or Hub name)")
    else:
        pivot = reference(data["pivot"], "pivot")
    raw_sources = data.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        problems.add("sources", "sources must be a non-empty list of entries like `- model: ./source-model`")
        raw_sources = []
    sources = []
    for i, entry in enumerate(raw_sources):
        p = f"sources[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            problems.add(p, "each source needs a `model:` (a path or Hub name)")
            continue
        problems.known_keys(entry, ("model",), p, "a source entry has only")
        sources.append(reference(entry["model"], f"{p}.model"))

    def data_file(key: str) -> Path | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            problems.add(key, f"must be the path of a JSONL file, not {value!r}")
            return None
        file = (doc.base_dir / Path(value).expanduser())
        if not file.is_file():
            problems.add(key, f"data file {str(file)!r} does not exist; check the path "
                              f"(relative paths are taken from the config file's folder)")
            return None
        return file

    train_file = None
    if data.get("data") is None:
        problems.add("data", "data is required: a JSONL file of chat `messages`, `prompt`/`response` or `text`")
    else:
        train_file = data_file("data")

    def integer(v, p, **kw):
        return _number(v, int, p, lines, **kw)

    def number(v, p, **kw):
        return _number(v, float, p, lines, **kw)

    def dtype(v, p, extra=()):
        if v in extra:
            return v
        found = output_dtype(v)
        if found is None:
            raise ConfigError(p, f"unknown dtype {v!r}; use {', '.join(extra + ('float32', 'bfloat16', 'float16'))}",
                              lines.get(p))
        return found.name

    def choice(v, p, options):
        if v not in options:
            raise ConfigError(p, f"{v!r} is not one of {', '.join(options)}", lines.get(p))
        return v

    def boolean(v, p):
        if not isinstance(v, bool):
            raise ConfigError(p, f"must be true or false, not {v!r}", lines.get(p))
        return v

    reps = _section(data, "representations", RepresentationSettings, problems, {
        "top_k": lambda v, p: integer(v, p, positive=True),
        "max_length": lambda v, p: integer(v, p, minimum=2, maximum=1 << 20),
        "batch_size": lambda v, p: integer(v, p, positive=True),
        "chunk_size": lambda v, p: integer(v, p, positive=True),
        "dtype": lambda v, p: dtype(v, p, ("auto",)),
        "store_dtype": lambda v, p: choice(v, p, ("float16", "float32")),
    })

    training = _section(data, "training", Training, problems, {
        "lm_loss_weight": lambda v, p: number(v, p, minimum=0.0, maximum=1.0),
        "epochs": lambda v, p: integer(v, p, positive=True),
        "learning_rate": lambda v, p: number(v, p, positive=True),
        "batch_size": lambda v, p: integer(v, p, positive=True),
        "gradient_accumulation_steps": lambda v, p: integer(v, p, positive=True),
        "warmup_ratio": lambda v, p: number(v, p, minimum=0.0, maximum=1.0),
        "weight_decay": lambda v, p: number(v, p, minimum=0.0, maximum=1e9),
        "seed": lambda v, p: integer(v, p, minimum=0, maximum=2**63 - 1),
        "dtype": dtype,
        "strategy": lambda v, p: choice(v, p, ("auto", "ddp", "fsdp")),
        "gradient_checkpointing": boolean,
        "packing": boolean,
        "max_length": lambda v, p: integer(v, p, minimum=2, maximum=1 << 20),
    })

    # alignment: a name, or {method: name, fallback: gold|pivot, carry: coarser|all}
    alignment, fallback, carry = data.get("alignment", "statistics"), "gold", "coarser"
    if isinstance(alignment, Mapping):
        problems.known_keys(alignment, ("method", "fallback", "carry"), "alignment", "alignment has")
        carry = alignment.get("carry", "coarser")
        if carry not in ("coarser", "all"):
            problems.add("alignment.carry", f"carry {carry!r} is unknown; use coarser (a source prediction only "
                                            f"where its next token covers the pivot's) or all (FuseChat's)")
        fallback = alignment.get("fallback", "gold")
        if fallback not in ("pivot", "gold"):
            problems.add("alignment.fallback", f"fallback {fallback!r} is unknown; use gold (the one-hot gold "
                                               f"token) or pivot (the pivot's own distribution)")
        alignment = alignment.get("method", "statistics")
    known = alignments()
    if alignment not in known:
        problems.add("alignment", f"unknown alignment {alignment!r}; known: {', '.join(sorted(known))} "
                                  f"(`fusion plugins` lists them)")
    function = data.get("fusion_function", "min_ce")
    known = fusion_functions()
    if function not in known:
        problems.add("fusion_function", f"unknown fusion function {function!r}; known: "
                                        f"{', '.join(sorted(known))} (`fusion plugins` lists them)")

    merge = problems.mapping(data.get("merge"), "merge", "{method: sce, parameters: {select_topk: 0.1}}")
    problems.known_keys(merge, ("method", "parameters"), "merge", "merge has")
    method = merge.get("method", "sce")
    params = problems.mapping(merge.get("parameters", dict(DEFAULT_SCE) if method == "sce" else {}),
                              "merge.parameters", "{select_topk: 0.1}")
    strategy = strategies().get(method) if isinstance(method, str) else None
    if strategy is None:
        problems.add("merge.method", f"unknown merge method {method!r}; known methods: "
                                     f"{', '.join(sorted(strategies()))} (`fusion plugins` lists them)")
    else:
        names = ", ".join(p.name for p in strategy.parameters) or "none"
        for key, value in params.items():
            path = f"merge.parameters.{key}"
            param = strategy.param(key)
            if param is None:
                problems.add(path, f"unknown parameter {key!r} for {strategy.name}; its parameters are: {names}")
                continue
            with problems.collect():
                param.check_value(value, path, lines)

    eval_fraction = 0.1
    eval_file = None
    raw_eval = data.get("eval_data")
    if isinstance(raw_eval, (int, float)) and not isinstance(raw_eval, bool):
        with problems.collect():
            eval_fraction = number(raw_eval, "eval_data", minimum=0.0, maximum=0.5)
    else:
        eval_file = data_file("eval_data")
    problems.done()
    return FuseConfig(
        pivot=pivot, sources=sources, data=train_file, eval_data=eval_file, eval_fraction=eval_fraction,
        representations=reps, alignment=alignment, fallback=fallback, carry=carry, fusion_function=function,
        training=training, merge_method=method, merge_parameters=dict(params), source=doc.source,
        text=doc.text, base_dir=doc.base_dir,
    )
