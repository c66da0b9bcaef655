"""Safetensors weights, single or sharded: headers parsed here without torch and validated
against the file size (so a plan never touches the weights and a truncated or corrupt file is
reported before any work), tensors read as views into read-only memory maps."""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from pathlib import Path
from typing import Any

from ..api.dtypes import DTYPES
from ..api.errors import CheckpointError
from .format import Format, Storage, TensorInfo, read_weight_map

MAX_HEADER = 100 * 1024 * 1024
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header; raise CheckpointError if it is damaged."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"{size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise _corrupt(path, f"header length {n} does not fit in {size} bytes")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(path, "the header is not JSON") from None
    return parse_header(header, path, data_start=8 + n, data_size=size - 8 - n)


def _corrupt(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid safetensors file ({reason}); it is corrupt or truncated: "
        f"download or save it again"
    )


def parse_header(header: Any, path: Path, *, data_start: int, data_size: int) -> dict[str, TensorInfo]:
    """Tensor entries of a decoded safetensors header, checked against the file's data size."""
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    out: dict[str, TensorInfo] = {}
    covered = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"bad entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise _corrupt(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
        info = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
        if not (0 <= begin <= end <= data_size) or end - begin != info.nbytes:
            raise _corrupt(path, f"tensor {name!r} has offsets {begin}..{end} that do not match its shape "
                                 f"{list(shape)} or the file's {data_size} data bytes")
        covered = max(covered, end)
        out[name] = info
    if covered != data_size:
        raise _corrupt(path, f"the header describes {covered} data bytes but the file has {data_size}")
    return out


def _from_index(index: Path, label: str) -> dict[str, TensorInfo]:
    weight_map = read_weight_map(index, label)
    headers: dict[str, dict[str, TensorInfo]] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, filename in weight_map.items():
        if filename not in headers:
            path = index.parent / filename
            if not path.is_file():
                raise CheckpointError(f"{label}: shard {filename} listed in {index.name} is missing; "
                                      f"download the complete model")
            headers[filename] = read_safetensors_header(path)
        if name not in headers[filename]:
            raise CheckpointError(f"{label}: tensor {name!r} is listed in {index.name} but not in {filename}; "
                                  f"the checkpoint is inconsistent: download or save it again")
        tensors[name] = headers[filename][name]
    for header in headers.values():
        for name, info in header.items():
            tensors.setdefault(name, info)  # tolerate tensors a stale index forgot
    return tensors


class MappedFiles(Storage):
    """Tensors as views into read-only memory maps of the files, one map per file."""

    name = "safetensors"

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with open(file, "rb") as f:
                mm = self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return mm

    def read(self, info: TensorInfo, label: str):
        import torch

        dtype = getattr(torch, DTYPES[info.dtype].name)
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        mm = self._map(info.file)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the map is read-only and no one writes to it
            flat = torch.frombuffer(mm, dtype=dtype, count=info.numel, offset=info.start)
        return flat.view(info.shape)

    def raw(self, info: TensorInfo) -> memoryview:
        if info.end <= info.start:
            return memoryview(b"")
        return memoryview(self._map(info.file))[info.start:info.end]

    def prefetch(self, info: TensorInfo) -> None:
        if not hasattr(mmap, "MADV_WILLNEED") or info.end <= info.start:
            return
        mm = self._map(info.file)
        start = info.start - info.start % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_WILLNEED, start, info.end - start)
        except (OSError, ValueError):
            pass

    def release(self, info: TensorInfo, begin: int = 0, end: int | None = None) -> None:
        mm = self._maps.get(info.file)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED") or info.end <= info.start:
            return
        first = info.start + begin
        last = info.end if end is None else min(info.end, info.start + end)
        start = first - first % mmap.PAGESIZE
        if last <= start:
            return
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, last - start)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a tensor still views it; the map closes when that is freed
                pass
        self._maps.clear()


class Safetensors(Format):
    @classmethod
    def recognises(cls, folder: Path) -> bool:
        return (folder / INDEX).is_file() or (folder / SINGLE).is_file()

    @classmethod
    def open(cls, folder: Path, label: str) -> tuple[dict[str, TensorInfo], Storage, int]:
        index = folder / INDEX
        tensors = _from_index(index, label) if index.is_file() else read_safetensors_header(folder / SINGLE)
        return tensors, MappedFiles(), 0
