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
from .format import ShardedFormat, Storage, TensorInfo, read_weight_map

MAX_HEADER = 100 * 1024 * 1024


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
        # the format says UTF-8; json.loads would also take UTF-16 and UTF-32 bytes
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise _corrupt(path, "the header is not UTF-8 text") from None
    except _Duplicate as dup:
        raise _corrupt(path, f"tensor {dup.args[0]!r} is listed twice in the header") from None
    except json.JSONDecodeError:
        raise _corrupt(path, "the header is not JSON") from None
    except RecursionError:
        raise _corrupt(path, "the header is nested too deeply") from None
    return parse_header(header, path, data_start=8 + n, data_size=size - 8 - n)


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _corrupt(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid safetensors file ({reason}); it is corrupt or truncated: "
        f"download or save it again"
    )


def _whole(value: Any) -> bool:
    return type(value) is int and value >= 0  # JSON whole numbers only: no floats, no booleans


def _entry(name: str, entry: Any, path: Path) -> tuple[str, tuple[int, ...], int, int]:
    """One tensor's (dtype, shape, begin, end), each of the JSON type the format prescribes."""
    if not isinstance(entry, dict):
        raise _corrupt(path, f"the entry of tensor {name!r} is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise _corrupt(path, f"tensor {name!r} has dtype {dtype!r}, not a dtype name")
    if dtype not in DTYPES:
        raise _corrupt(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_whole(d) for d in shape):
        raise _corrupt(path, f"tensor {name!r} has shape {shape!r}, not a list of whole numbers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(o) for o in offsets):
        raise _corrupt(path, f"tensor {name!r} has data_offsets {offsets!r}, not two whole numbers")
    return dtype, tuple(shape), offsets[0], offsets[1]


def data_extent(header: Any) -> int:
    """How many data bytes a decoded header describes (0 when it is too damaged to say)."""
    if not isinstance(header, dict):
        return 0
    ends = [e["data_offsets"][1] for k, e in header.items() if k != "__metadata__" and isinstance(e, dict)
            and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2]
    return max((x for x in ends if _whole(x)), default=0)


def parse_header(header: Any, path: Path, *, data_start: int, data_size: int) -> dict[str, TensorInfo]:
    """Tensor entries of a decoded safetensors header, checked against the file's data size: the
    tensors tile the data bytes exactly, in some order, with no overlap and no gap (as the
    format requires; one tensor's bytes can never be read as another's)."""
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise _corrupt(path, "__metadata__ is not a JSON object")
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(name, entry, path)
        info = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
        if not (begin <= end <= data_size) or end - begin != info.nbytes:
            raise _corrupt(path, f"tensor {name!r} has offsets {begin}..{end} that do not match its shape "
                                 f"{list(shape)} or the file's {data_size} data bytes")
        out[name] = info
    covered, last = 0, None
    for info in sorted(out.values(), key=lambda i: (i.start, i.end)):
        begin, end = info.start - data_start, info.end - data_start
        if begin < covered:
            raise _corrupt(path, f"tensors {last!r} and {info.name!r} share data bytes {begin}..{min(end, covered)}")
        if begin > covered:
            raise _corrupt(path, f"data bytes {covered}..{begin} belong to no tensor")
        covered, last = end, info.name
    if covered != data_size:
        raise _corrupt(path, f"the header describes {covered} data bytes but the file has {data_size}")
    return out


def _from_index(index: Path, label: str) -> dict[str, TensorInfo]:
    weight_map = read_weight_map(index, label)
    headers: dict[Path, dict[str, TensorInfo]] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, path in weight_map.items():
        if path not in headers:
            if not path.is_file():
                raise CheckpointError(f"{label}: shard {path.relative_to(index.parent)} listed in {index.name} "
                                      f"is missing; download the complete model")
            headers[path] = read_safetensors_header(path)
        if name not in headers[path]:
            raise CheckpointError(f"{label}: tensor {name!r} is listed in {index.name} but not in "
                                  f"{path.relative_to(index.parent)}; the checkpoint is inconsistent: "
                                  f"download or save it again")
        tensors[name] = headers[path][name]
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


class Safetensors(ShardedFormat):
    index = "model.safetensors.index.json"
    single = "model.safetensors"

    @classmethod
    def open(cls, folder: Path, label: str) -> tuple[dict[str, TensorInfo], Storage, int]:
        path, sharded = cls.weights(folder, label)
        tensors = _from_index(path, label) if sharded else read_safetensors_header(path)
        return tensors, MappedFiles(), 0
