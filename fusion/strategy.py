"""The strategy API: what a merge strategy declares and what the host promises it.

A strategy merges one tensor at a time. The host resolves every declared parameter for that
tensor (per-layer gradients and name filters already applied), validates it against the
declaration, and calls :meth:`Strategy.merge` with float32 tensors. Per-model parameters arrive
as lists in model order; global ones as scalars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .errors import ConfigError

if TYPE_CHECKING:  # torch stays out of `fusion --help` and `fusion plugins`
    import torch

    from . import kernels

_TYPE_NAMES = {float: "number", int: "integer", bool: "true/false", str: "string"}


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

    def check(self, value: Any, path: str, line: int | None = None) -> Any:
        """Return ``value`` coerced to the declared type, or raise a ConfigError naming ``path``."""
        t = self.type
        if t is bool:
            if not isinstance(value, bool):
                raise ConfigError(path, f"{self.name} must be true or false, not {value!r}", line)
        elif t in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(path, f"{self.name} must be a {_TYPE_NAMES[t]}, not {value!r}", line)
            if t is int and not float(value).is_integer():
                raise ConfigError(path, f"{self.name} must be an integer, not {value!r}", line)
            value = t(value)
            if not math.isfinite(value):
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

    def describe(self) -> dict:
        return {
            "name": self.name,
            "type": _TYPE_NAMES.get(self.type, self.type.__name__),
            "default": self.default,
            "scope": "per-model" if self.per_model else "global",
            "range": self.range_text,
            "help": self.help,
        }


class Strategy:
    """Base class of tensor merge strategies.

    Subclasses set the class attributes and implement :meth:`merge` as the plain torch
    reference: it is the executable form of the strategy's documented semantics and the oracle
    that every faster kernel is tested against.
    """

    #: Name used as ``merge_method`` in configs.
    name: str = ""
    #: One line for ``fusion plugins`` and the model card.
    description: str = ""
    #: Link to the paper that defines the method (shown in ``fusion plugins`` and model cards).
    paper: str | None = None
    #: Declared parameters; anything else in a config is an error.
    parameters: Sequence[Param] = ()
    #: "required": needs ``base_model``; "optional": uses it when given; "unused": ignores it.
    base: str = "required"
    #: True when each output element depends only on the inputs at the same position; the host
    #: then merges large tensors in row chunks, so memory does not grow with tensor size.
    elementwise: bool = False

    def merge(
        self,
        base: "torch.Tensor | None",
        tensors: "Sequence[torch.Tensor]",
        params: Mapping[str, Any],
    ) -> "torch.Tensor":
        """Merge one tensor: ``base`` (θ₀, or None) and the models' tensors (θ₁..θₙ), all float32
        and of one shape, into a float32 tensor of that shape."""
        raise NotImplementedError

    def merge_compiled(
        self,
        out: "kernels.Buffer",
        base: "kernels.Buffer | None",
        tensors: "Sequence[kernels.Buffer]",
        params: Mapping[str, Any],
        *,
        threads: int,
        release: bool,
    ) -> int:
        """Optional compiled path, used under ``--kernel c`` (and ``auto`` when the C kernels are
        built): merge the inputs as stored (flat :class:`fusion.kernels.Buffer` runs of bfloat16,
        float16 or float32; read-only) straight into ``out``, a flat buffer of the output dtype,
        typically with :mod:`fusion.kernels`. Return the number of non-finite values written.
        ``threads`` and ``release`` are passed on to the kernels. The result must agree with
        :meth:`merge`."""
        raise NotImplementedError

    @property
    def compiled(self) -> bool:
        """Whether this strategy has a compiled path (overrides :meth:`merge_compiled`)."""
        return type(self).merge_compiled is not Strategy.merge_compiled

    def param(self, name: str) -> Param | None:
        for p in self.parameters:
            if p.name == name:
                return p
        return None

    def describe(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "paper": self.paper,
            "base_model": self.base,
            "parameters": [p.describe() for p in self.parameters],
        }

    def __repr__(self) -> str:
        return f"<Strategy {self.name}>"
