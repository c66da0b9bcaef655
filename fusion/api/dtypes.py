"""Tensor dtypes: the one table of safetensors codes, torch names, sizes and the names a config
may write for an output dtype."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Dtype:
    code: str  # as safetensors headers write it: "BF16"
    name: str  # as torch and numpy name it: "bfloat16"
    size: int  # bytes per element
    floating: bool = False
    #: what a config may write for it (``out_dtype: bf16``); empty: not an output dtype
    aliases: tuple[str, ...] = ()


DTYPES: dict[str, Dtype] = {d.code: d for d in (
    Dtype("F64", "float64", 8, True, ("float64", "fp64", "double")),
    Dtype("F32", "float32", 4, True, ("float32", "fp32", "float")),
    Dtype("F16", "float16", 2, True, ("float16", "fp16", "half")),
    Dtype("BF16", "bfloat16", 2, True, ("bfloat16", "bf16")),
    Dtype("F8_E4M3", "float8_e4m3fn", 1), Dtype("F8_E5M2", "float8_e5m2", 1),
    Dtype("I64", "int64", 8), Dtype("I32", "int32", 4), Dtype("I16", "int16", 2), Dtype("I8", "int8", 1),
    Dtype("U8", "uint8", 1), Dtype("BOOL", "bool", 1),
)}
_BY_NAME = {d.name: d for d in DTYPES.values()}
_BY_ALIAS = {alias: d for d in DTYPES.values() for alias in d.aliases}
#: The output dtypes a config may ask for, as it may spell them.
OUTPUT_NAMES = tuple(_BY_ALIAS)


def dtype(code: str) -> Dtype:
    """The dtype of a safetensors code (``KeyError`` for one the table does not know)."""
    return DTYPES[code]


def from_name(name: str) -> Dtype | None:
    """The dtype torch calls ``name`` (``"bfloat16"``, ``"torch.bfloat16"``), or None."""
    return _BY_NAME.get(str(name).removeprefix("torch."))


def output_dtype(alias: object) -> Dtype | None:
    """The output dtype a config names (``bf16``, ``float16``, ``torch.float16``…), or None for
    anything else."""
    return _BY_ALIAS.get(alias.removeprefix("torch.")) if isinstance(alias, str) else None


def nbytes(code: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of safetensors dtype ``code`` and ``shape``."""
    return math.prod(shape) * DTYPES[code].size
