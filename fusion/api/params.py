"""Declared parameters: what a strategy accepts, and the one check every config value passes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError

_TYPE_NAMES = {float: "number", int: "integer", bool: "true/false", str: "string"}
#: The words a boolean may be written as (with 0/1 and 0.0/1.0), as pydantic reads them.
_BOOL_WORDS = {**dict.fromkeys(("true", "t", "yes", "y", "on", "1"), True),
               **dict.fromkeys(("false", "f", "no", "n", "off", "0"), False)}


@dataclass(frozen=True)
class Param:
    """One declared strategy parameter.

    ``per_model`` parameters (``weight``, ``density``) may be set for each model and default to
    the global ``parameters`` section; global ones may be set only there. ``minimum``/``maximum``
    bound numbers, inclusive unless ``exclusive_minimum``/``exclusive_maximum``.
    """

    name: str
    type: type = float
    default: Any = None
    per_model: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple | None = None
    help: str = ""
    #: the config must set it (for every model, if per-model): there is no sensible default
    required: bool = False

    @property
    def range_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.minimum is None and self.maximum is None:
            return ""
        lo = "(" if self.exclusive_minimum or self.minimum is None else "["
        hi = ")" if self.exclusive_maximum or self.maximum is None else "]"
        lo_v = "-inf" if self.minimum is None else f"{self.minimum:g}"
        hi_v = "inf" if self.maximum is None else f"{self.maximum:g}"
        return f"{lo}{lo_v}, {hi_v}{hi}"

    def coerce(self, value: Any) -> Any:
        """``value`` in the declared type, read as mergekit's configs are (pydantic's lax mode):
        ``1.0``/``0`` and ``"yes"``/``"off"`` are booleans, ``"0.5"`` is a number, ``10.0`` an
        integer; anything else is returned as it is, for :meth:`check` to refuse."""
        t = self.type
        if t is bool:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
                return _BOOL_WORDS[value.strip().lower()]
        elif t in (int, float):
            if isinstance(value, str):
                try:
                    value = float(value.strip())
                except ValueError:
                    return value
            elif isinstance(value, bool):
                value = float(value)
            try:
                if isinstance(value, (int, float)) and (t is float or float(value).is_integer()):
                    return t(value)
            except OverflowError:  # too large for a float: for check to refuse
                pass
        return value

    def check(self, value: Any, path: str, line: int | None = None) -> Any:
        """Return ``value`` coerced to the declared type, or raise a ConfigError naming ``path``."""
        t = self.type
        value = self.coerce(value)
        if t is bool:
            if not isinstance(value, bool):
                raise ConfigError(path, f"{self.name} must be true or false, not {value!r}", line)
        elif t in (int, float):
            if not isinstance(value, (int, float)):  # coerce has made a bool a number
                raise ConfigError(path, f"{self.name} must be a {_TYPE_NAMES[t]}, not {value!r}", line)
            try:
                if t is int and not float(value).is_integer():
                    raise ConfigError(path, f"{self.name} must be an integer, not {value!r}", line)
                value, finite = t(value), math.isfinite(value)
            except OverflowError:  # an integer beyond any float
                digits = str(value)
                shown = digits if len(digits) < 24 else f"{digits[:12]}… ({len(digits)} digits)"
                raise ConfigError(path, f"{self.name} = {shown} is too large for a number", line) from None
            if not finite:
                raise ConfigError(path, f"{self.name} must be finite, not {value!r}", line)
            if self.minimum is not None and (
                value < self.minimum or (self.exclusive_minimum and value == self.minimum)
            ) or self.maximum is not None and (
                value > self.maximum or (self.exclusive_maximum and value == self.maximum)
            ):
                raise ConfigError(
                    path, f"{self.name} = {value:g} is out of range; it must be in {self.range_text}", line
                )
        elif t is str:
            if not isinstance(value, str):
                raise ConfigError(path, f"{self.name} must be a string, not {value!r}", line)
        if self.choices is not None and value not in self.choices:
            raise ConfigError(path, f"{self.name} = {value!r} is not allowed; use {self.range_text}", line)
        return value

    def check_value(self, value: Any, path: str, lines: Mapping[str, int] | None = None,
                    nested: bool = False) -> None:
        """Validate every leaf of a config value of this parameter: a scalar, a gradient (a list
        of values over the layers: numbers are interpolated, other values are steps) or a filter list (``[{filter: mlp, value: …}, {value: …}]``).
        ``lines`` maps config paths to line numbers for the message."""
        lines = lines or {}
        line = lines.get(path)
        if isinstance(value, list):
            if not value:
                raise ConfigError(path, f"{self.name} is an empty list; give a value, a gradient or a filter list",
                                  line)
            if all(isinstance(v, Mapping) for v in value):
                if nested:
                    raise ConfigError(path, "filter lists cannot be nested", line)
                for i, entry in enumerate(value):
                    p = f"{path}[{i}]"
                    extra = set(entry) - {"filter", "value"}
                    if extra or "value" not in entry:
                        raise ConfigError(p, "a filter entry is {filter: <substring>, value: <value>}; "
                                             "the last entry may omit filter", lines.get(p))
                    default = entry.get("filter") in (None, "*")  # mergekit's ways to write "any tensor"
                    if default and i != len(value) - 1:
                        raise ConfigError(p, "only the last entry may omit `filter` (it is the default)",
                                          lines.get(p))
                    if not default and not isinstance(entry["filter"], str):
                        raise ConfigError(f"{p}.filter", "a filter is a substring of tensor names", lines.get(p))
                    self.check_value(entry["value"], f"{p}.value", lines, nested=True)
                return
            if self.type is int and len(value) > 1:
                raise ConfigError(path, f"{self.name} is an integer, so it cannot be a gradient (between layers "
                                        f"it would take fractional values); give one value or a filter list", line)
            for i, v in enumerate(value):
                self.check(v, f"{path}[{i}]", lines.get(f"{path}[{i}]", line))
            return
        self.check(value, path, line)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "type": _TYPE_NAMES.get(self.type, self.type.__name__),
            "default": self.default,
            "scope": "per-model" if self.per_model else "global",
            "range": self.range_text,
            "help": self.help,
            "required": self.required,
        }
