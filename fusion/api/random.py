"""Reproducible random numbers for seeded strategies (DARE, DELLA, …).

A merge has one ``random_seed``; each tensor gets its own seed from it and the tensor's name
(:func:`tensor_seed`), and element i of a tensor draws from a counter-based generator keyed by
that seed and i alone (:func:`uniform`). So the numbers depend on neither the thread count, nor
the kernel path, nor the order tensors are merged in, nor how a tensor is split into chunks:
a compiled kernel reproduces them exactly with the same integer arithmetic.

The generator is SplitMix64's output function applied to ``seed + (i + 1)·γ`` (γ = 2⁶⁴/φ), and a
uniform draw keeps its top 24 bits: ``u = (z >> 40) · 2⁻²⁴``, exactly representable in float32,
in [0, 1).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def tensor_seed(random_seed: int, name: str) -> int:
    """The 64-bit seed of tensor ``name`` in a merge seeded with ``random_seed``."""
    digest = hashlib.blake2b(f"{random_seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def stream_seed(seed: int, stream: int) -> int:
    """The seed of independent stream ``stream`` (0, 1, …) of a tensor seeded with ``seed``: a
    strategy that draws for several models gives model i the stream i, so that models do not
    drop the same entries. A hash, like :func:`tensor_seed`, in its own domain."""
    digest = hashlib.blake2b(f"{seed}:{stream}".encode(), digest_size=8, person=b"fusion-stream").digest()
    return int.from_bytes(digest, "little")


def mix(z: int) -> int:
    """SplitMix64's output function on one 64-bit integer (the scalar twin of :func:`uniform`)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def uniform(seed: int, start: int, count: int) -> "np.ndarray":
    """``count`` float32 draws in [0, 1) for elements ``start .. start + count − 1``."""
    import numpy as np

    with np.errstate(over="ignore"):
        i = np.arange(start + 1, start + count + 1, dtype=np.uint64)
        z = np.uint64(seed & _MASK) + i * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24))
