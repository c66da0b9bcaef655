"""The strategy contract: what a merge strategy declares and what the host promises it.

A strategy merges one tensor at a time. The host resolves every declared parameter for that
tensor (per-layer gradients and name filters already applied), validates it against the
declaration, and calls :meth:`Strategy.merge` with float32 tensors and a :class:`TensorContext`
that says which tensor it is. Per-model parameters arrive as lists in model order; global ones
as scalars.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .architecture import part_of
from .params import Param

if TYPE_CHECKING:  # torch stays out of `fusion --help` and `fusion plugins`
    import torch

    from . import kernels


@dataclass(frozen=True)
class TensorContext:
    """The tensor being merged, as the plan knows it.

    ``name`` is the output tensor's name and ``canonical`` its layout-independent name (equal
    across the models); ``role`` is one of :data:`fusion.api.architecture.ROLES`; ``layer`` its
    layer index (None outside the layers) among ``num_layers``; ``shape`` the shape of the
    tensors handed to the strategy (the rows all models share, for embeddings of different
    vocabulary sizes). ``seed`` is this tensor's own 64-bit seed, derived from the merge's
    ``random_seed`` and the tensor's name, so a seeded strategy draws the same numbers whatever
    order or thread the tensors are merged in. ``start`` is the flat index of the first element
    handed over: 0, except for elementwise strategies, which the host may call on consecutive
    row chunks. ``models`` names the merged models in the order of ``tensors``.
    """

    name: str
    canonical: str = ""
    role: str = "other"
    layer: int | None = None
    num_layers: int = 1
    shape: tuple[int, ...] = ()
    seed: int = 0
    start: int = 0
    models: tuple[str, ...] = ()

    @property
    def part(self) -> str:
        """``language_model``, ``vision_tower``, ``projector`` or ``other``."""
        return part_of(self.role)


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
    #: How many models (besides the base) the strategy merges; ``fusion plan`` refuses others.
    min_models: int = 1
    max_models: int | None = None
    #: True when each output element depends only on the inputs at the same position; the host
    #: then merges large tensors in row chunks, so memory does not grow with tensor size.
    elementwise: bool = False
    #: True when the strategy draws random numbers (from ``context.seed``, see
    #: :mod:`fusion.api.random`); the host then draws a ``random_seed`` when the config has none
    #: and reports it, so the merge can be repeated.
    random: bool = False

    def merge(
        self,
        base: "torch.Tensor | None",
        tensors: "Sequence[torch.Tensor]",
        params: Mapping[str, Any],
        context: TensorContext,
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
        context: TensorContext,
        *,
        threads: int,
        release: bool,
    ) -> int:
        """Optional compiled path, used under ``--kernel c`` (and ``auto`` when the C kernels are
        built): merge the inputs as stored (flat :class:`fusion.api.kernels.Buffer` runs of bfloat16,
        float16 or float32; read-only) straight into ``out``, a flat buffer of the output dtype,
        typically with :mod:`fusion.api.kernels`. Return the number of non-finite values written.
        ``threads`` and ``release`` are passed on to the kernels. The result must agree with
        :meth:`merge`."""
        raise NotImplementedError

    def check(self, params: Mapping[str, Any], context: TensorContext) -> str | Sequence[str] | None:
        """The problems with the parameters resolved for one tensor that the declared ranges
        cannot state (where one parameter's valid range depends on another's), each one sentence
        that names the model and says how to fix it: a sentence, a list of them, or None (or an
        empty list) when they are fine. ``fusion plan`` asks for every merged tensor, so a bad
        value stops the merge before any weight is read."""
        return None

    def deviations(self, params: Sequence[Mapping[str, Any]], compute_dtype: str) -> Sequence[str]:
        """One line each (``fusion plan`` prints them) for the ways this merge computes
        differently, on purpose, from mergekit's method of the same name where that changes the
        result by more than rounding. ``params`` are the parameters resolved for each merged
        tensor; ``compute_dtype`` is the dtype mergekit computes in for this config (its
        ``dtype``, else the inputs'), see :func:`float32_note`. The default says nothing."""
        return ()

    @property
    def compiled(self) -> bool:
        """Whether this strategy has a compiled path (overrides :meth:`merge_compiled`)."""
        return type(self).merge_compiled is not Strategy.merge_compiled

    def param(self, name: str) -> Param | None:
        for p in self.parameters:
            if p.name == name:
                return p
        return None

    def models_text(self) -> str:
        """How many models it merges, in words (``2 or more``, ``exactly 1``)."""
        lo, hi = self.min_models, self.max_models
        if hi is None:
            return f"{lo} or more"
        return f"exactly {lo}" if lo == hi else f"{lo} to {hi}"

    def describe(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "paper": self.paper,
            "base_model": self.base,
            "models": {"min": self.min_models, "max": self.max_models},
            "parameters": [p.describe() for p in self.parameters],
        }

    def __repr__(self) -> str:
        return f"<Strategy {self.name}>"


def float32_note(method: str, compute_dtype: str) -> str | None:
    """The line for a method mergekit computes in the inputs' dtype: where that is 16-bit, its
    intermediates (task vectors, partial sums) are rounded, while fusion computes in float32 and
    rounds once."""
    if compute_dtype not in ("bfloat16", "float16"):
        return None
    return (f"float32 math: mergekit computes {method} in {compute_dtype} here, rounding every intermediate; "
            f"fusion computes in float32 and rounds once, at the end (set `dtype: float32` to compare)")


def float32_deviations(self: Strategy, params: Sequence[Mapping[str, Any]], compute_dtype: str) -> list[str]:
    """A :meth:`Strategy.deviations` for a method whose only such difference is float32 math
    (assign it: ``deviations = float32_deviations``)."""
    return [n for n in (float32_note(self.name, compute_dtype),) if n]


def seeded_note() -> str:
    """The line for a method that drops entries at random."""
    return ("seeded draws: fusion draws the random masks from its counter-based generator keyed by random_seed, "
            "mergekit from torch's global one; the same distribution, other entries")


def tie_break_note() -> str:
    """The line for a method that keeps the top k entries by a key."""
    return ("top-k ties: where equal keys straddle the k-th largest, fusion keeps the lower indices and "
            "mergekit an arbitrary subset of them")
