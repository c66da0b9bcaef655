"""The stage caches of `fusion fuse`: named numpy arrays in a safetensors file, tagged with the
key of the inputs they were made from. A file is written beside its final name and renamed, so
it is complete or absent; a damaged or stale one is recomputed, never trusted (and never a pickle).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def save_arrays(path: Path, arrays: dict[str, np.ndarray], key: str) -> None:
    from safetensors.numpy import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata={"key": key})
    os.replace(tmp, path)


def load_arrays(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays cached at ``path`` if they were made from the inputs ``key`` names, else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception:  # a damaged cache is recomputed, not trusted
        return None
