"""What every weight format provides: tensor entries, and a storage that reads them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..api.dtypes import nbytes
from ..api.errors import CheckpointError
from ..api.modelfiles import contained, load_json


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    file: Path
    start: int = 0  # absolute byte offsets in `file` (safetensors)
    end: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


class Storage:
    """Where an opened checkpoint's tensors come from. Subclasses override what they can do."""

    name: ClassVar[str] = ""

    def read(self, info: TensorInfo, label: str):
        """The tensor as stored, a torch tensor (a read-only view where possible)."""
        raise NotImplementedError

    def raw(self, info: TensorInfo) -> memoryview:
        raise CheckpointError(f"{info.file}: {self.name} weights have no raw bytes to read")

    def prefetch(self, info: TensorInfo) -> None:
        """A hint that the tensor is read soon (nothing waits for it)."""

    def release(self, info: TensorInfo, begin: int = 0, end: int | None = None) -> None:
        """A hint that the tensor's bytes [begin, end) are not read again."""

    def close(self) -> None:
        pass


class Format:
    """One way of storing weights in a model folder."""

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        raise NotImplementedError

    @classmethod
    def open(cls, folder: Path, label: str) -> tuple[dict[str, TensorInfo], Storage, int]:
        """The folder's tensors, the storage that reads them, and what is still to download."""
        raise NotImplementedError


class ShardedFormat(Format):
    """Weights in one file, or in shards that an index file maps tensor names to."""

    index: ClassVar[str]  # the index file's name
    single: ClassVar[str]  # the single weights file's name

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        return (folder / cls.index).is_file() or (folder / cls.single).is_file()

    @classmethod
    def weights(cls, folder: Path, label: str) -> tuple[Path, bool]:
        """The index (and True) where the folder has one, else the single file (and False),
        either checked to lie inside the folder."""
        if (folder / cls.index).is_file():
            return contained(folder, cls.index, label), True
        return contained(folder, cls.single, label), False


def read_weight_map(index: Path, label: str) -> dict[str, Path]:
    """The ``weight_map`` of a sharded checkpoint's index: tensor name → shard file, every shard
    checked to lie inside the model folder (:func:`fusion.api.modelfiles.contained`)."""
    data = load_json(index, label)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{label}: {index} is not a valid index (a JSON object with a non-empty "
                              f"weight_map); download or save the model again")
    shards: dict[str, Path] = {}
    out: dict[str, Path] = {}
    for name, filename in weight_map.items():
        if not isinstance(filename, str) or not filename:
            raise CheckpointError(f"{label}: {index} maps tensor {name!r} to {filename!r}, which is not a "
                                  f"file name; download or save the model again")
        if filename not in shards:
            shards[filename] = contained(index.parent, filename, label, named_by=index)
        out[name] = shards[filename]
    return out
