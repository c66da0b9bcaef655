"""Compiled building blocks for a strategy's ``merge_compiled``: exact, threaded merges over raw
buffers, and the selection and conversions they are made of.

The C extension (``fusion.api._kernels``) is built by ``pip install`` when a C compiler is present;
without one the install still succeeds and every merge runs on the torch reference
(:func:`available` says which). The merges take flat runs of bfloat16, float16 or float32 numbers,
as :class:`Buffer` objects or contiguous CPU torch tensors (in a merge, Buffers over the
read-only memory maps of the input files: torch is not even imported), and write the result
straight into ``out``, a buffer of the output dtype:

- arithmetic in float32 in the order each formula is written (the order of the plain torch
  expression), rounded once to the output dtype (nearest even, as torch's cast); a multiply and an
  add fuse only where a docstring says so; float64 sums of squares are the one sum taken in
  another order, which can move a result by one unit in the last place;
- top-k selection by radix select on the keys' bit patterns, ties at the k-th key to the lower
  index: the same masks as :func:`fusion.api.selection.topk_mask`;
- no full-size float32 temporaries: each pass streams the inputs in small blocks;
- ``threads`` (default :func:`default_threads`) pthreads, started with the GIL released, each
  on one contiguous range; the result does not depend on it.

Each merge returns the number of non-finite values it wrote (the host rejects them).
``release=True`` promises that the inputs are read-only file maps: the kernels then drop the
pages they have read from the process as they go, so resident memory does not grow with the
tensor. Never pass it for tensors in ordinary memory (their contents would be lost).

Importing this module does not import torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, Union

if TYPE_CHECKING:
    import numpy as np
    import torch

try:
    from . import _kernels as _c
except ImportError as exc:  # not compiled: the torch reference does the work
    _c = None
    _why = str(exc)
else:
    _why = ""

__all__ = ["Buffer", "Keep", "available", "buffer", "default_threads", "empty", "from_bytes", "status",
           "supports", "weighted_sum", "sparsified_merge", "trimmed_sign_merge", "variance_selected_merge",
           "gram", "combination", "distance_blend", "changed_mean", "change_counts", "kl_outlier_merge",
           "topk_mask", "convert"]

#: dtype name → code understood by the C kernels
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
#: sparsification modes of the C sparse merge (fusion/csrc/sparsify.h)
_NONE, _TOPK, _BAND, _RANDOM, _RANKED = range(5)
_DRAWS = 1 << 24  # a draw is an integer below 2²⁴ (fusion.api.random keeps 24 bits)


@dataclass(frozen=True)
class Buffer:
    """``numel`` numbers of ``dtype`` ("bfloat16", "float16" or "float32") stored contiguously
    at ``address``; ``owner`` is whatever keeps that memory alive (an array, a tensor, a map)."""

    address: int
    dtype: str
    numel: int
    owner: Any = None


if TYPE_CHECKING:
    Tensorish = Union[Buffer, torch.Tensor]


@dataclass(frozen=True)
class Keep:
    """Which entries of one task vector δ = θ − θ₀ :func:`sparsified_merge` keeps: make one with
    the class methods, which follow :mod:`fusion.api.sparsify` mask for mask. Magnitudes rank in
    that module's order (larger |δ| first, equal ones by the lower flat index); draws are
    ``fusion.api.random.uniform(seed, first + j)`` for the entry at flat index j."""

    mode: int
    a: int = 0
    b: int = 0
    seed: int = 0
    density: float = 0.0
    epsilon: float = 0.0

    @classmethod
    def all(cls) -> "Keep":
        """Every entry."""
        return cls(_NONE)

    @classmethod
    def top(cls, k: int) -> "Keep":
        """The k entries of largest |δ| (none for k = 0, all for k ≥ n)."""
        return cls(_TOPK, max(0, int(k)))

    @classmethod
    def band(cls, skip: int, keep: int) -> "Keep":
        """The ``keep`` entries that follow the ``skip`` largest |δ| (breadcrumbs' band)."""
        return cls(_BAND, max(0, int(skip)) + max(0, int(keep)), max(0, int(skip)))

    @classmethod
    def random(cls, seed: int, density: float) -> "Keep":
        """Entry j iff its draw u < density (DARE): the kernel compares the 24-bit draw with
        ceil(density·2²⁴), which is the same test."""
        return cls(_RANDOM, min(_DRAWS, max(0, math.ceil(density * _DRAWS))), seed=seed, density=density)

    @classmethod
    def ranked(cls, seed: int, density: float, epsilon: float) -> "Keep":
        """Entry j iff its draw u < pⱼ = (d − ε) + 2ε·ρⱼ, ρⱼ the rank of |δⱼ| within its row (0 for
        the smallest, 1 for the largest; rows as :func:`fusion.api.sparsify.row_layout`), in
        float64 (DELLA); d ≥ 1 keeps every entry and d ≤ 0 none."""
        if density >= 1:
            return cls.all()
        if density <= 0:
            return cls.top(0)
        return cls(_RANKED, seed=seed, density=float(density), epsilon=float(epsilon))


def from_bytes(data: Any, dtype: str, numel: int) -> Buffer:
    """A :class:`Buffer` of ``numel`` numbers of ``dtype`` at the start of ``data``, any object
    with the buffer protocol (a memoryview into a map, a bytearray), read-only or not."""
    _need()
    if memoryview(data).nbytes < numel * (4 if dtype == "float32" else 2):
        raise ValueError(f"{numel} {dtype} numbers do not fit in {memoryview(data).nbytes} bytes")
    return Buffer(_c.address(data) if numel else 0, dtype, numel, data)


def empty(nbytes: int) -> bytearray:
    """An uninitialized bytearray of ``nbytes`` (for outputs the kernels fill completely)."""
    _need()
    return _c.empty(nbytes)


def buffer(obj: "Tensorish") -> Buffer:
    """A :class:`Buffer` for a Buffer or a contiguous CPU torch tensor."""
    if isinstance(obj, Buffer):
        return obj
    if obj.device.type != "cpu" or not obj.is_contiguous():
        raise ValueError("the C kernels need contiguous CPU tensors")
    return Buffer(obj.data_ptr(), str(obj.dtype).removeprefix("torch."), obj.numel(), obj)


def available() -> bool:
    """True when the C kernels are built in this installation."""
    return _c is not None


def status() -> str:
    """One line saying which merge kernels are active, for ``fusion plugins``."""
    if _c is not None:
        return f"merge kernels: C (built; --kernel auto uses it; {default_threads()} threads by default)"
    return (f"merge kernels: torch reference only (the C extension is not built: {_why}); "
            f"reinstall fusion where a C compiler is available to build it")


def default_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def supports(dtype: "torch.dtype | str") -> bool:
    """Whether the kernels read and write numbers of ``dtype`` (a torch dtype or its name)."""
    return str(dtype).removeprefix("torch.") in DTYPE_CODES


def _need() -> None:
    if _c is None:
        from .errors import FusionError

        raise FusionError("the C kernels are not built in this installation; reinstall fusion "
                          "where a C compiler is available, or use --kernel torch")


def _buffer(t: "Tensorish", n: int, what: str) -> tuple[int, int]:
    b = buffer(t)
    code = DTYPE_CODES.get(b.dtype)
    if code is None:
        raise TypeError(f"{what}: dtype {b.dtype} is not supported by the C kernels")
    if b.numel != n:
        raise ValueError(f"{what}: expected {n} elements, not {b.numel}")
    return b.address, code


def _inputs(base, tensors, n: int) -> list:
    both = ([base] if base is not None else []) + list(tensors)
    return [_buffer(t, n, f"input {i}") for i, t in enumerate(both)]


def _threads(threads: int | None) -> int:
    return default_threads() if threads is None else max(1, int(threads))


def _out(out: "Tensorish") -> tuple[int, int, int]:
    n = buffer(out).numel
    return (*_buffer(out, n, "out"), n)


def _mask(m: "torch.Tensor", n: int) -> int:
    import torch

    if m.dtype != torch.bool or not m.is_contiguous() or m.numel() != n:
        raise ValueError(f"a mask must be a contiguous bool tensor of {n} elements")
    return m.data_ptr()


# ---------------------------------------------------------------------------------------------
# Merges


def weighted_sum(out: Tensorish, tensors: Sequence[Tensorish], weights: Sequence[float], *,
                 base: Tensorish | None = None, scale: float = 1.0, normalize: bool = False,
                 threads: int | None = None, release: bool = False) -> int:
    """The weighted sum of ``tensors``, or of their differences from ``base``:

        S = Σᵢ wᵢ·θᵢ            without a base,   out = scale·S
        S = Σᵢ wᵢ·(θᵢ − θ₀)     with base θ₀,     out = θ₀ + scale·S

    with S divided by Σ wᵢ before the scaling when ``normalize``. In float32, in model order: the
    first term a product, each next one added by a fused multiply-add (as
    ``Tensor.add_(t, alpha=w)``), the scaled sum added to θ₀ by another (as
    ``θ₀.add_(S, alpha=scale)``). The divisor is the float64 sum of ``weights`` rounded to
    float32; a zero sum divides by zero (inf/NaN, counted as non-finite), so decide before calling
    what a zero sum means.

    Inputs and ``out``: Buffers or contiguous CPU tensors of n bfloat16, float16 or float32
    numbers, any mix. ``threads``: how many threads share the work (default: every CPU this
    process may use); the result does not depend on it. ``release``: the inputs are read-only
    file maps whose pages may be dropped once read (see the top of this module). Returns the
    number of non-finite values written.
    """
    _need()
    o, code, n = _out(out)
    inputs = _inputs(base, tensors, n)
    return _c.weighted_sum(o, code, n, inputs, [float(w) for w in weights], base is not None,
                           float(scale), bool(normalize), float(sum(weights)), _threads(threads),
                           bool(release))


def sparsified_merge(out: Tensorish, base: Tensorish, tensors: Sequence[Tensorish],
                     weights: Sequence[float], keep: Sequence[Keep], *,
                     rescale: bool | Sequence[bool] = False, elect_signs: bool = True,
                     normalize: bool = True, scale: float = 1.0, shape: Sequence[int] | None = None,
                     first: int = 0, threads: int | None = None, release: bool = False,
                     masks: Sequence["torch.Tensor"] | None = None) -> tuple[int, list[float | None]]:
    """Sparsify each task vector, then elect signs and take the mean of the agreeing entries, or
    add them up:

        δ̂ᵢ = δᵢ = θᵢ − θ₀ on the entries ``keep[i]`` keeps, 0 elsewhere; with ``rescale[i]``,
             δ̂ᵢ ← sᵢ·δ̂ᵢ, sᵢ = Σ|δᵢ| / Σ|δ̂ᵢ| rounded to float32, unless either is below 1e-7 (the
             sums as :func:`fusion.api.sparsify.abs_sum`: exact, so order-free)
        with ``elect_signs``:  xᵢ = wᵢ·δ̂ᵢ;  s = +1 where Σᵢ xᵢ ≥ 0, else −1;  mᵢ = [sign(xᵢ) = s]
             out = θ₀ + scale · Σᵢ mᵢxᵢ / D,  D = Σᵢ mᵢwᵢ (1 where 0) if ``normalize``, else 1
        without:  S = Σᵢ wᵢ·δ̂ᵢ, added as :func:`weighted_sum` adds (a product, then fused
             multiply-adds), divided by Σᵢ wᵢ when ``normalize`` (decide first what a zero sum
             means);  out = θ₀ + scale·S, fused
        and NaN wherever some δᵢ is not finite (so such an input is never silently dropped).

    ``shape`` (default: flat) gives DELLA's rows; ``first`` is the draws' index of element 0 (the
    ``start`` of a chunk). ``masks``, optional contiguous bool tensors of n elements, one per
    model, receive the keep masks. Float32 arithmetic in the order written.

    Inputs and ``out``: Buffers or contiguous CPU tensors of n bfloat16, float16 or float32
    numbers, any mix. ``threads``: how many threads share the work (default: every CPU this
    process may use); the result does not depend on it. ``release``: the inputs are read-only
    file maps whose pages may be dropped once read (see the top of this module). Returns
    (non-finite values written, [sᵢ, or None where no factor applied]).
    """
    _need()
    o, code, n = _out(out)
    inputs = _inputs(base, tensors, n)
    if len(keep) != len(tensors):
        raise ValueError(f"keep: expected a rule for each of the {len(tensors)} models, not {len(keep)}")
    flags = [bool(rescale)] * len(tensors) if isinstance(rescale, bool) else [bool(r) for r in rescale]
    if len(flags) != len(tensors):
        raise ValueError(f"rescale: expected a flag for each of the {len(tensors)} models")
    shape = tuple(shape) if shape is not None else (n,)
    if math.prod(shape) != n:
        raise ValueError(f"shape {list(shape)} does not have {n} elements")
    rows = (1, n, 1) if len(shape) < 2 else (shape[0], shape[1], math.prod(shape[2:]))
    rules = [(r.mode, f, r.a, r.b, r.seed & (2**64 - 1), float(r.density), float(r.epsilon))
             for r, f in zip(keep, flags)]
    mask_ptrs = None if masks is None else [_mask(m, n) for m in masks]
    return _c.sparse_merge(o, code, n, inputs, [float(w) for w in weights], rules, int(first), rows,
                           bool(elect_signs), bool(normalize), float(scale), float(sum(weights)),
                           _threads(threads), bool(release), mask_ptrs)


def trimmed_sign_merge(out: Tensorish, base: Tensorish, tensors: Sequence[Tensorish],
                       weights: Sequence[float], ks: Sequence[int], *, scale: float = 1.0,
                       normalize: bool = True, elect_signs: bool = True, threads: int | None = None,
                       release: bool = False, masks: Sequence["torch.Tensor"] | None = None) -> int:
    """Trim each task vector to its largest entries, elect a sign per entry, take the mean of the
    entries that agree with it (TIES): :func:`sparsified_merge` with ``Keep.top(kᵢ)``:

        δ̂ᵢ = δᵢ = θᵢ − θ₀ on the kᵢ positions of largest |δᵢ| (ties at the kᵢ-th to the lower
             index, as :func:`fusion.api.selection.topk_mask`), 0 elsewhere;  xᵢ = wᵢ·δ̂ᵢ
        s  = +1 where Σᵢ xᵢ ≥ 0, else −1;   mᵢ = [sign(xᵢ) = s]  (a zero entry never agrees)
        out = θ₀ + scale · Σᵢ mᵢxᵢ / D,   D = Σᵢ mᵢwᵢ (1 where 0) if ``normalize``, else 1

    ``elect_signs=False`` skips the election and adds the trimmed task vectors as
    :func:`sparsified_merge` does. Each kᵢ is a count (0 keeps nothing, n or more everything);
    ``masks``, optional contiguous bool tensors of n elements, one per model, receive the trimmed
    positions. Returns the number of non-finite values written; the other arguments are those of
    :func:`sparsified_merge`.
    """
    if len(ks) != len(tensors):
        raise ValueError(f"ks: expected one count for each of the {len(tensors)} models")
    bad, _ = sparsified_merge(out, base, tensors, weights, [Keep.top(k) for k in ks], elect_signs=elect_signs,
                              normalize=normalize, scale=scale, threads=threads, release=release, masks=masks)
    return bad


def variance_selected_merge(out: Tensorish, base: Tensorish, tensors: Sequence[Tensorish], *,
                            fraction: float, mask_deltas: bool = True, scale: float = 1.0,
                            threads: int | None = None, release: bool = False,
                            mask: "torch.Tensor | None" = None) -> tuple[int, list[float]]:
    """Select the positions where the task vectors vary most across models, weight each model by
    its energy there, and drop the entries whose sign disagrees with the elected one:

        v  = (1/N)·Σᵢ (δᵢ − μ)², μ = (1/N)·Σᵢ δᵢ, per position (float64, rounded to float32)
        S  = the floor(fraction·count_nonzero(v)) positions of largest v, ties to the lower
             index (every position when fraction ≥ 1)
        ηᵢ = Σ(δᵢ⊙S)² / Σⱼ Σ(δⱼ⊙S)²   (1/N each when the total is 0)
        δ̃ᵢ = δᵢ⊙S if ``mask_deltas`` else δᵢ;  s = +1 where Σᵢ δ̃ᵢ ≥ 0, else −1;
        mᵢ = [sign(δ̃ᵢ) = s];  out = θ₀ + scale · Σᵢ ηᵢmᵢδ̃ᵢ / Σᵢ ηᵢmᵢ  (1 where 0)

    The energies are float64 sums taken in another order than a chunked torch sum, so ηᵢ and
    the result may differ from it by one unit in the last place. ``mask``, an optional contiguous
    bool tensor of n elements, receives S.

    Inputs and ``out``: Buffers or contiguous CPU tensors of n bfloat16, float16 or float32
    numbers, any mix. ``threads``: how many threads share the work (default: every CPU this
    process may use); the result does not depend on it. ``release``: the inputs are read-only
    file maps whose pages may be dropped once read (see the top of this module). Returns
    (non-finite values written, [Σ(δᵢ⊙S)² per model]).
    """
    _need()
    o, code, n = _out(out)
    inputs = _inputs(base, tensors, n)
    return _c.variance_merge(o, code, n, inputs, float(fraction), bool(mask_deltas), float(scale),
                             _threads(threads), bool(release),
                             None if mask is None else [_mask(mask, n)])


def _vector_layout(n: int, shape: Sequence[int] | None, vectors: str) -> tuple[int, int, bool, int]:
    """(rows, cols, columns, count) of the tensor as a matrix whose vectors are its rows or columns
    (one vector: a single row, whatever the layout)."""
    from .vectors import matrix_shape, vector_count

    shape = (n,) if shape is None else tuple(shape)
    rows, cols = matrix_shape(shape, vectors)
    if rows * cols != n:
        raise ValueError(f"shape {list(shape)} does not have {n} elements")
    count = vector_count(shape, vectors)
    if count == 1:
        return 1, n, False, 1
    return rows, cols, vectors == "columns", count


def gram(tensors: Sequence[Tensorish], base: Tensorish | None = None, *,
         shape: Sequence[int] | None = None, vectors: str = "tensor", threads: int | None = None,
         release: bool = False) -> "np.ndarray":
    """The float64 Gram matrix of the inputs per vector, G[v, i, j] = xᵢ·xⱼ over vector v, with
    xᵢ = θᵢ, or θᵢ − θ₀ (rounded to float32) given a ``base``: the C twin of
    :func:`fusion.api.vectors.gram` (its docstring gives the layouts; ``shape`` is the tensor's,
    needed for ``rows`` and ``columns``). Products are exact in float64; the sums are taken in an
    order fixed by the data (a row's or a column's by one thread, the whole tensor in fixed chunks
    added in order), so the result does not depend on ``threads``, and differs from torch's sums
    by a few float64 ulps at most.

    Inputs: Buffers or contiguous CPU tensors of n bfloat16, float16 or float32 numbers, any mix.
    ``release``: the inputs are read-only file maps whose pages may be dropped once read (see the
    top of this module). Returns an array of shape (vectors, m, m).
    """
    import numpy as np

    _need()
    n = buffer(tensors[0]).numel
    rows, cols, columns, count = _vector_layout(n, shape, vectors)
    inputs = _inputs(base, tensors, n)
    out = np.zeros((count, len(tensors), len(tensors)), dtype=np.float64)
    _c.gram(inputs, base is not None, rows, cols, columns, out.ctypes.data, _threads(threads),
            bool(release))
    return out


def combination(out: Tensorish, tensors: Sequence[Tensorish], coefficients: Any,
                base: Tensorish | None = None, *, shape: Sequence[int] | None = None,
                vectors: str = "tensor", threads: int | None = None, release: bool = False) -> int:
    """out = Σᵢ cᵢ·xᵢ per vector, + θ₀ given a ``base`` (xᵢ = θᵢ − θ₀ then): the C twin of
    :func:`fusion.api.vectors.combination`, with the same arithmetic (coefficients rounded to
    float32; each product and each sum rounded, models in order, the base added last).
    ``coefficients`` has shape (vectors, m) (or (m,) for one vector).

    Inputs and ``out``: Buffers or contiguous CPU tensors of n bfloat16, float16 or float32
    numbers, any mix. ``threads``: how many threads share the work; the result does not depend
    on it. ``release``: as for :func:`gram`. Returns the number of non-finite values written.
    """
    import numpy as np

    _need()
    o, code, n = _out(out)
    rows, cols, columns, count = _vector_layout(n, shape, vectors)
    inputs = _inputs(base, tensors, n)
    coef = np.asarray(coefficients, dtype=np.float64).reshape(count, len(tensors)).astype(np.float32)
    by_input = np.ascontiguousarray(coef.T)  # [input][vector]
    return _c.combination(o, code, inputs, base is not None, rows, cols, columns, by_input.ctypes.data,
                          _threads(threads), bool(release))


def distance_blend(out: Tensorish, base: Tensorish, other: Tensorish, t: float, *,
                   threads: int | None = None, release: bool = False) -> int:
    """Per element, w = clamp(t / max(|θ₀ − θ₁|, 1e-6), 0, 1) and out = w·θ₁ + (1 − w)·θ₀: the other
    value where the two are within t, else a step of t toward it. Float32, the quotient as
    (1/max(…))·t, NaN passing every clamp (as the torch expression of nearswap evaluates it).

    Inputs and ``out``: Buffers or contiguous CPU tensors of n bfloat16, float16 or float32
    numbers, any mix; ``threads`` and ``release`` as everywhere here. Returns the number of
    non-finite values written.
    """
    _need()
    o, code, n = _out(out)
    return _c.distance_blend(o, code, n, _inputs(base, [other], n), float(t), _threads(threads), bool(release))


def changed_mean(out: Tensorish, base: Tensorish, tensors: Sequence[Tensorish], epsilon: float, *,
                 scales: Sequence[float] | None = None, threads: int | None = None,
                 release: bool = False) -> int:
    """The mean of the models' changes over the models that make them: model i changes an entry
    where |δᵢ| > ε (νᵢ, ε rounded to float32), c = Σ νᵢ, and

        out = θ₀ + Σᵢ tᵢ,   tᵢ = νᵢδᵢ / max(c, 1)   (or νᵢδᵢ·scales[i] where c = 1, given scales)

    in float32, νᵢδᵢ as δᵢ times 1 or 0, the terms added in model order, then θ₀.

    Inputs and ``out``: Buffers or contiguous CPU tensors of n bfloat16, float16 or float32
    numbers, any mix; ``threads`` and ``release`` as everywhere here. Returns the number of
    non-finite values written.
    """
    _need()
    o, code, n = _out(out)
    return _c.changed_mean(o, code, n, _inputs(base, tensors, n), float(epsilon),
                           None if scales is None else [float(x) for x in scales], _threads(threads),
                           bool(release))


def change_counts(base: Tensorish, tensors: Sequence[Tensorish], epsilon: float, *,
                  threads: int | None = None, release: bool = False) -> tuple[list[int], list[int]]:
    """For each model, how many of its changed entries (|δᵢ| > ε) other models change too, and
    how many it alone changes: ``(shared, unique)``, two lists of counts."""
    _need()
    n = buffer(base).numel
    return _c.change_counts(n, _inputs(base, tensors, n), float(epsilon), _threads(threads), bool(release))


def kl_outlier_merge(out: Tensorish, base: Tensorish, other: Tensorish, *, shape: Sequence[int] | None = None,
                     threads: int | None = None, release: bool = False) -> int:
    """Keep the changes of outlying importance: per row (along the last axis of ``shape``; a
    tensor of fewer than two dimensions is one row)

        KL = Σ p·log(p/q),  p = softmax(θ₁'s row) + 1e-8,  q = softmax(θ₀'s row) + 1e-8

    in float64, rounded to float32; importance I = |θ₁ − θ₀|·KL (float32); Q₁, Q₂, Q₃ the
    importances of rank ⌊q·(n−1)⌋ (ascending; q = ¼, ½, ¾) found exactly by radix select; and
    out = θ₀ + (θ₁ − θ₀)·[I ≥ Q₂ + 1.5·(Q₃ − Q₁)]. Only the row divergences are kept in memory.

    Inputs and ``out``: Buffers or contiguous CPU tensors of n bfloat16, float16 or float32
    numbers, any mix; ``threads`` and ``release`` as everywhere here. Returns the number of
    non-finite values written.
    """
    _need()
    o, code, n = _out(out)
    rows, cols, _, _ = _vector_layout(n, shape, "rows")
    return _c.outlier_merge(o, code, _inputs(base, [other], n), rows, cols, _threads(threads), bool(release))


# ---------------------------------------------------------------------------------------------
# Selection and conversion, on torch tensors


def topk_mask(key: "torch.Tensor", k: int, threads: int | None = None) -> "torch.Tensor":
    """The bool mask of the ``k`` largest keys, ties at the k-th to the lower flat index: the
    masks of :func:`fusion.api.selection.topk_mask`, by radix select over the keys' bit
    patterns (-0.0 equals 0.0; NaN ranks above every number). ``key`` is a bfloat16, float16 or
    float32 tensor; the mask has its shape."""
    import torch

    _need()
    n = key.numel()
    if not 0 <= k <= n:
        raise ValueError(f"k = {k} is out of range for a tensor of {n} elements")
    flat = key.reshape(-1).contiguous()
    mask = torch.empty(n, dtype=torch.bool)
    ptr, code = _buffer(flat, n, "key")
    _c.topk_mask(ptr, code, n, int(k), mask.data_ptr(), _threads(threads))
    return mask.reshape(key.shape)


def convert(t: "torch.Tensor", dtype: "torch.dtype", threads: int | None = None) -> "torch.Tensor":
    """``t`` cast to ``dtype`` (bfloat16, float16 or float32) through float32 by the kernels' own
    loads and stores: round to nearest even and NaN kept, as torch's cast does. Every merge above
    writes its output this way, so this is how their rounding is tested."""
    import torch

    _need()
    flat = t.reshape(-1).contiguous()
    out = torch.empty(flat.numel(), dtype=dtype)
    src, scode = _buffer(flat, flat.numel(), "input")
    dst, dcode = _buffer(out, flat.numel(), "out")
    _c.convert(src, scode, dst, dcode, flat.numel(), _threads(threads))
    return out.reshape(t.shape)
