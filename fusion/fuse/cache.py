"""The stage caches of `fusion fuse`: named numpy arrays in safetensors files, tagged with the
key of the inputs they were made from. A file is written beside its final name and renamed, so
it is complete or absent; a damaged or stale one is recomputed, never trusted (and never a pickle).

Readers map the files instead of reading them (:func:`open_arrays`), so a stage that walks
gigabytes of representations keeps only the pages it touches.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np

#: safetensors dtype codes of the arrays the caches hold
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "U8": np.uint8, "BOOL": np.bool_}


def save_arrays(path: Path, arrays: dict[str, np.ndarray], key: str, **metadata: str) -> None:
    from safetensors.numpy import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata={"key": key, **metadata})
    os.replace(tmp, path)


def read_header(path: Path) -> tuple[dict, int] | None:
    """A safetensors file's decoded header and where its data starts, or None if unreadable."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return None
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20:
                return None
            header = json.loads(f.read(n))
        return (header, 8 + n) if isinstance(header, dict) else None
    except (OSError, ValueError):
        return None


def open_arrays(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """Read-only arrays mapped from the cache file at ``path`` if it was made from the inputs
    ``key`` names, else None. The map stays open as long as any array views it."""
    found = read_header(path)
    if found is None:
        return None
    header, start = found
    if (header.get("__metadata__") or {}).get("key") != key:
        return None
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = np.dtype(_DTYPES[entry["dtype"]])
            a, b = entry["data_offsets"]
            shape = tuple(entry["shape"])
            count = int(np.prod(shape)) if shape else 1
            if start + b > size or b - a != count * dtype.itemsize:
                return None
            flat = np.frombuffer(mm, dtype=dtype, count=count, offset=start + a) if count else np.zeros(0, dtype)
            out[name] = flat.reshape(shape)
        return out
    except (OSError, KeyError, ValueError, TypeError):  # a damaged cache is recomputed, not trusted
        return None


def metadata(path: Path) -> dict[str, str]:
    found = read_header(path)
    return dict((found[0].get("__metadata__") or {})) if found else {}


def load_arrays(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """Like :func:`open_arrays`, but copies into memory (for small files read whole)."""
    arrays = open_arrays(path, key)
    return None if arrays is None else {k: np.array(v) for k, v in arrays.items()}


def remove_stale_temporaries(folder: Path) -> None:
    """Drop the half-written files an interrupted run left (``.name.tmp-PID``)."""
    if folder.is_dir():
        for p in folder.glob(".*.tmp-*"):
            try:
                p.unlink()
            except OSError:
                pass
