"""Reading config files, merge and fuse alike: YAML with the line of every config path, and a
collector that reports every problem of a config at once instead of the first.

Paths are written as users read them: ``models[1].parameters.density``. Relative paths in a
config are taken from the config file's folder (:attr:`Document.base_dir`).
"""

from __future__ import annotations

import difflib
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


def read_document(path: str | Path) -> Document:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", f"config file {str(path)!r} does not exist; check the path") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"config file {str(path)!r} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    return parse_document(text, source=path)


def parse_document(text: str, source: Path | None = None) -> Document:
    data, lines = parse_yaml(text, str(source or "config"))
    return Document(data, lines, source, text)


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
