"""The compiled merge kernels: exact, fused, threaded C versions of the built-in strategies.

The C extension (``fusion.api._kernels``) is built by ``pip install`` when a C compiler is present;
without one the install still succeeds and every merge runs on the torch reference
(:func:`available` says which). The functions here take flat runs of bfloat16, float16 or
float32 numbers, as :class:`Buffer` objects or contiguous CPU torch tensors (in a merge, Buffers
over the read-only memory maps of the input files: torch is not even imported), and write the
result straight into ``out``, a buffer of the output dtype:

- arithmetic in float32 in the reference's order, rounded once to the output dtype (nearest
  even, as torch's cast), so results equal the torch reference's; SCE's float64 sums of squares
  are added in another order, which can move a result by one unit in the last place at most;
- top-k selection by radix select on the keys' bit patterns, ties at the k-th key to the lower
  index: the same masks as :func:`fusion.api.selection.topk_mask`;
- no full-size float32 temporaries: each pass streams the inputs in small blocks;
- ``threads`` pthreads, started with the GIL released, each on one contiguous range.

Each merge function returns the number of non-finite values it wrote (the host rejects them).
``release=True`` promises that the inputs are read-only file maps: the kernels then drop the
pages they have read from the process as they go, so resident memory does not grow with the
tensor. Never pass it for tensors in ordinary memory (their contents would be lost).

Importing this module does not import torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

try:
    from . import _kernels as _c
except ImportError as exc:  # not compiled: the torch reference does the work
    _c = None
    _why = str(exc)
else:
    _why = ""

__all__ = ["Buffer", "available", "buffer", "default_threads", "empty", "from_bytes", "status",
           "supports", "linear", "task_arithmetic", "ties", "sce", "topk_mask", "convert"]

#: dtype name → code understood by the C kernels
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}


@dataclass(frozen=True)
class Buffer:
    """``numel`` numbers of ``dtype`` ("bfloat16", "float16" or "float32") stored contiguously
    at ``address``; ``owner`` is whatever keeps that memory alive (an array, a tensor, a map)."""

    address: int
    dtype: str
    numel: int
    owner: Any = None


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


def buffer(obj: "Buffer | torch.Tensor") -> Buffer:
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


def _buffer(t: "Buffer | torch.Tensor", n: int, what: str) -> tuple[int, int]:
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


def linear(out: "Buffer | torch.Tensor", tensors: Sequence["Buffer | torch.Tensor"], weights: Sequence[float], *,
           normalize: bool, threads: int | None = None, release: bool = False) -> int:
    """out = Σ wᵢθᵢ, divided by Σ wᵢ when ``normalize`` (the caller rejects a zero sum)."""
    _need()
    n = buffer(out).numel
    o, code = _buffer(out, n, "out")
    return _c.weighted_sum(o, code, n, _inputs(None, tensors, n), [float(w) for w in weights], False,
                           1.0, bool(normalize), float(sum(weights)), _threads(threads), bool(release))


def task_arithmetic(out: "Buffer | torch.Tensor", base: "Buffer | torch.Tensor", tensors: Sequence["Buffer | torch.Tensor"],
                    weights: Sequence[float], *, lam: float, normalize: bool,
                    threads: int | None = None, release: bool = False) -> int:
    """out = θ₀ + λ·Σ wᵢ(θᵢ − θ₀), the sum divided by Σ wᵢ when ``normalize``."""
    _need()
    n = buffer(out).numel
    o, code = _buffer(out, n, "out")
    return _c.weighted_sum(o, code, n, _inputs(base, tensors, n), [float(w) for w in weights], True,
                           float(lam), bool(normalize), float(sum(weights)), _threads(threads), bool(release))


def ties(out: "Buffer | torch.Tensor", base: "Buffer | torch.Tensor", tensors: Sequence["Buffer | torch.Tensor"],
         weights: Sequence[float], ks: Sequence[int], *, lam: float, normalize: bool,
         threads: int | None = None, release: bool = False,
         masks: Sequence["torch.Tensor"] | None = None) -> int:
    """TIES with kᵢ entries of each task vector kept; ``masks`` (bool tensors, optional)
    receive the trim masks."""
    _need()
    n = buffer(out).numel
    o, code = _buffer(out, n, "out")
    mask_ptrs = None if masks is None else [_mask(m, n) for m in masks]
    return _c.sparse_merge(o, code, n, _inputs(base, tensors, n), [float(w) for w in weights], 1,
                           [(int(k),) for k in ks], True, bool(normalize), float(lam), _threads(threads),
                           bool(release), mask_ptrs)


def sce(out: "Buffer | torch.Tensor", base: "Buffer | torch.Tensor", tensors: Sequence["Buffer | torch.Tensor"], *,
        tau: float, scope_all: bool, lam: float, threads: int | None = None,
        release: bool = False, mask: "torch.Tensor | None" = None) -> tuple[int, list[float]]:
    """SCE; returns (non-finite count, Σ(δᵢ⊙S)² per model). ``mask`` (bool, optional) receives
    the selection S."""
    _need()
    n = buffer(out).numel
    o, code = _buffer(out, n, "out")
    return _c.variance_merge(o, code, n, _inputs(base, tensors, n), float(tau), bool(scope_all), float(lam),
                             _threads(threads), bool(release), None if mask is None else [_mask(mask, n)])


def _mask(m: "torch.Tensor", n: int) -> int:
    import torch

    if m.dtype != torch.bool or not m.is_contiguous() or m.numel() != n:
        raise ValueError(f"a mask must be a contiguous bool tensor of {n} elements")
    return m.data_ptr()


def topk_mask(key: "torch.Tensor", k: int, threads: int | None = None) -> "torch.Tensor":
    """The C twin of :func:`fusion.api.selection.topk_mask` (same masks, by radix select)."""
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


def convert(t: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
    """``t`` cast to ``dtype`` by the kernels' own conversions (for testing them)."""
    import torch

    _need()
    flat = t.reshape(-1).contiguous()
    out = torch.empty(flat.numel(), dtype=dtype)
    src, scode = _buffer(flat, flat.numel(), "input")
    dst, dcode = _buffer(out, flat.numel(), "out")
    _c.convert(src, scode, dst, dcode, flat.numel(), 1)
    return out.reshape(t.shape)
