"""Reading config files, merge and fuse alike: YAML with the line of every config path, and a
collector that reports every problem of a config at once instead of the first.

Paths are written as users read them: ``models[1].parameters.density``. Relative paths in a
config are taken from the config file's folder (:attr:`Document.base_dir`).
"""

from __future__ import annotations

import difflib
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .api.errors import ConfigError, ConfigErrors


@dataclass
class Document:
    """A parsed config: its data, the line of each config path, and where it came from."""

    data: Any
    lines: dict[str, int] = field(default_factory=dict)
    source: Path | None = None
    text: str = ""

    @property
    def base_dir(self) -> Path:
        return self.source.resolve().parent if self.source else Path.cwd()

    @property
    def name(self) -> str:
        return str(self.source) if self.source else "config"


#: The largest config file read: a merge config is a page of YAML (this also stops `/dev/zero`).
MAX_CONFIG_BYTES = 4 << 20
#: The most values a config may hold, counting each use of a YAML alias: aliases are expanded
#: wherever the config is walked, so a few lines of nested aliases ("billion laughs") could
#: otherwise stand for billions of values.
MAX_VALUES = 20_000


def read_document(path: str | Path) -> Document:
    path = Path(path)
    where = f"config file {str(path)!r}"
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError("", f"{where} does not exist; check the path") from None
    except IsADirectoryError:
        raise ConfigError("", f"{where} is a folder; give the YAML file") from None
    except OSError as exc:
        raise ConfigError("", f"cannot read {where}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError("", f"{where} is larger than {MAX_CONFIG_BYTES >> 20} MB, which no merge config "
                              f"is; check the path")
    return parse_document(_decode(raw, where), source=path)


def _line_column(text: str | bytes, position: int) -> tuple[int, int]:
    """The 1-based line and column of ``position`` in ``text``."""
    newline = b"\n" if isinstance(text, bytes) else "\n"
    return text.count(newline, 0, position) + 1, position - text.rfind(newline, 0, position)


def _decode(raw: bytes, where: str) -> str:
    """UTF-8 text (a UTF-8 byte-order mark is dropped); anything else is refused by name."""
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                      (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if raw.startswith(bom):
            raise ConfigError("", f"{where} is {name} text; save it as UTF-8")
    if raw and raw.count(0) * 4 >= len(raw):  # ASCII in UTF-16 or UTF-32 without a mark
        raise ConfigError("", f"{where} looks like UTF-16 or UTF-32 text; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, column = _line_column(raw, exc.start)
        raise ConfigError("", f"{where} is not UTF-8 text (byte {raw[exc.start]:#04x} at line {line}, "
                              f"column {column}); save it as UTF-8") from None


def parse_document(text: str, source: Path | None = None) -> Document:
    data, lines = parse_yaml(text, str(source or "config"))
    return Document(data, lines, source, text)


_MERGE_TAG = "tag:yaml.org,2002:merge"
_FLOAT_TAG = "tag:yaml.org,2002:float"


def _scan(root: Any, source: str) -> dict[str, int]:
    """The line of every config path, walking the composed YAML (before any value is built):
    each use of an alias is counted (at most :data:`MAX_VALUES` in all), an alias inside its own
    anchor is refused, and so are duplicated keys and numbers too large for a float; every
    such problem is raised at once."""
    import yaml

    lines: dict[str, int] = {}
    problems: list[ConfigError] = []
    count = 0
    open_nodes: set[int] = set()  # the nodes being walked: one seen again is inside itself
    stack: list[tuple[bool, Any, str]] = [(True, root, "")]
    while stack:
        enter, node, path = stack.pop()
        if not enter:
            open_nodes.discard(id(node))
            continue
        line = node.start_mark.line + 1
        if id(node) in open_nodes:
            raise ConfigError(path, "this YAML alias refers to the value it is part of, which never ends; "
                                    "write the value out", lines.get(path, line))
        count += 1
        if count > MAX_VALUES:
            raise ConfigError("", f"{source}: the config holds more than {MAX_VALUES} values, counting each "
                                  f"use of a YAML alias; a merge config has far fewer: write them out")
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _FLOAT_TAG and _overflows(node.value):
                problems.append(ConfigError(path, f"{node.value} is too large for a number (the largest is "
                                                  f"about 1.8e308)", lines.get(path, line)))
            continue
        open_nodes.add(id(node))
        stack.append((False, node, path))
        children: list[tuple[str, Any]] = []
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            explicit = [(k, v) for k, v in node.value if k.tag != _MERGE_TAG]
            own = {id(k) for k, _ in explicit}
            for key, value in explicit + _merged_pairs(node):
                child = f"{path}.{key.value}" if path else str(key.value)
                ident = (key.tag, key.value) if isinstance(key, yaml.ScalarNode) else id(key)
                if ident in seen:
                    if id(key) in own:  # a key from `<<: *anchor` yields to the mapping's own
                        problems.append(ConfigError(child, f"duplicate key {key.value!r} (first at line "
                                                           f"{seen[ident]}); keep one of them",
                                                    key.start_mark.line + 1))
                    continue
                seen[ident] = key.start_mark.line + 1
                lines[child] = key.start_mark.line + 1
                children.append((child, value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                child = f"{path}[{i}]"
                lines[child] = item.start_mark.line + 1
                children.append((child, item))
        stack.extend((True, value, child) for child, value in reversed(children))
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ConfigErrors(problems)
    return lines


def _merged_pairs(node: Any) -> list[tuple[Any, Any]]:
    """The (key, value) pairs a mapping takes from its ``<<`` merge keys, nearest first."""
    import yaml

    out: list[tuple[Any, Any]] = []
    seen: set[int] = set()
    todo = [v for k, v in node.value if k.tag == _MERGE_TAG]
    while todo:
        source = todo.pop(0)
        if id(source) in seen:
            continue
        seen.add(id(source))
        sources = source.value if isinstance(source, yaml.SequenceNode) else [source]
        for mapping in sources:
            if isinstance(mapping, yaml.MappingNode):
                out += [(k, v) for k, v in mapping.value if k.tag != _MERGE_TAG]
                todo += [v for k, v in mapping.value if k.tag == _MERGE_TAG]
    return out


def _overflows(text: str) -> bool:
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        return False
    return math.isinf(value) and "inf" not in text.lower()


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


#: Flow collections (``[...]``, ``{...}``) deeper than this are refused before parsing: PyYAML's
#: scanner takes time quadratic in the depth before its composer gives up.
MAX_FLOW_DEPTH = 100
_FLOW_TOKENS = re.compile(r"""'(?:[^']|'')*'|"(?:[^"\\]|\\.)*"|(?:^|(?<=\s))#[^\n]*|[\[\]{}]""", re.M)


def _flow_depth(text: str) -> int:
    """How deep flow collections nest, brackets inside quotes and comments left out."""
    depth = deepest = 0
    for m in _FLOW_TOKENS.finditer(text):
        token = m.group()
        if token in ("[", "{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in ("]", "}"):
            depth -= 1
    return deepest


def parse_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    import yaml

    if _flow_depth(text) > MAX_FLOW_DEPTH:
        raise ConfigError("", f"{source}: the YAML is nested too deeply to be a merge config; check the file")

    loader = None
    try:
        loader = _loader_class()(text)  # the reader refuses control characters right away
        node = loader.get_single_node()
        lines = _scan(node, source) if node is not None else {}
        data = loader.construct_document(node) if node is not None else None
    except yaml.reader.ReaderError as exc:
        line, column = _line_column(text, exc.position)
        code = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
        what = "a NUL byte" if code == 0 else f"the control character U+{code:04X}"
        raise ConfigError("", f"{source}: {what} at line {line}, column {column} is not allowed in YAML; "
                              f"a config is plain text: check the file") from None
    except yaml.composer.ComposerError as exc:
        if "another document" not in str(exc):
            raise _syntax_error(exc, source) from None
        raise ConfigError("", f"{source}: the file holds several YAML documents (the second starts at line "
                              f"{exc.problem_mark.line + 1}); a merge config is one document: merge in stages, "
                              f"one config each, naming the previous output as a model") from None
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, source) from None
    except RecursionError:
        raise ConfigError("", f"{source}: the YAML is nested too deeply to be a merge config; check the "
                              f"file") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


def _syntax_error(exc: Exception, source: str) -> ConfigError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return ConfigError("", f"{source}: YAML syntax error{where}: {problem}; fix the YAML and retry")


class Problems:
    """Collects the problems of one config; :meth:`done` raises them all at once. Notes (things
    accepted but worth saying, such as a setting that has no effect) are kept in :attr:`notes`."""

    def __init__(self, lines: Mapping[str, int]):
        self.lines = lines
        self.errors: list[ConfigError] = []
        self.notes: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.errors.append(ConfigError(path, message, self.lines.get(path)))

    def note(self, path: str, message: str) -> None:
        line = self.lines.get(path)
        self.notes.append(f"{path}" + (f" (line {line})" if line else "") + f": {message}")

    @contextmanager
    def collect(self) -> Iterator[None]:
        """Record a ConfigError raised inside the block and carry on after it."""
        try:
            yield
        except ConfigErrors as exc:
            self.errors += exc.errors
        except ConfigError as exc:
            self.errors.append(exc)

    def done(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ConfigErrors(self.errors)

    def mapping(self, value: Any, path: str, example: str) -> Mapping:
        """``value`` if it is a mapping (None is an empty one); else a problem and {}."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.add(path, f"must be a mapping such as {example}")
            return {}
        return value

    def known_keys(self, data: Mapping, allowed: Sequence[str], prefix: str = "",
                   what: str = "allowed keys", hints: Mapping[str, str] | None = None) -> None:
        """A problem for each key of ``data`` not in ``allowed``: the hint given for it, else the
        allowed key it is a likely typo of, else the allowed keys."""
        for key in data:
            if key not in allowed:
                path = f"{prefix}.{key}" if prefix else str(key)
                hint = (hints or {}).get(str(key))
                close = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1, cutoff=0.75)
                if hint is None and close:
                    hint = f"did you mean `{close[0]}`?"
                self.add(path, f"unknown key; {hint or f'{what}: ' + ', '.join(allowed)}")


def model_reference(value: Any, path: str, lines: Mapping[str, int]) -> str:
    """A model named in a config: a local path or a Hub name, stripped; else a ConfigError."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f"must be a model path or Hub name (org/name[@revision]), not {value!r}",
                          lines.get(path))
    return value.strip()
