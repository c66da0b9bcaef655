"""Which files of a Hub repository a merge needs: the weights in one format, and the model files
beside them (fusion.api.modelfiles)."""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

from fusion.api.modelfiles import is_safe_name, is_support_file

SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
# Weight formats fusion cannot read, named in the "no weights" error so the user sees why.
OTHER_WEIGHTS = (".gguf", ".h5", ".msgpack", ".onnx", ".pth", ".pt", ".ckpt", ".ot", ".safetensors")


def select_files(files: Iterable[str], read_json: Callable[[str], Any]) -> tuple[list[str], list[str]]:
    """Split a repository's file list into (weight files, support files) a merge needs.

    ``read_json(name)`` returns a parsed JSON file of the repository; it is only called for a
    weight index, whose ``weight_map`` names the exact shards (repositories such as Mistral's also
    carry a ``consolidated.safetensors`` copy of the same weights that must not be downloaded).
    """
    files = [f for f in files if is_safe_name(f)]  # a listing naming ../x is not followed there
    top = {f for f in files if "/" not in f}
    weights = _weight_files(top, set(files), read_json)
    support = sorted(f for f in files if is_support_file(f))
    return weights, support


def _weight_files(top: set[str], every: set[str], read_json: Callable[[str], Any]) -> list[str]:
    for index, single, suffix, prefix in (
        (SAFETENSORS_INDEX, "model.safetensors", ".safetensors", ""),
        (PYTORCH_INDEX, "pytorch_model.bin", ".bin", "pytorch_model"),
    ):
        if index in top:
            parsed = read_json(index)
            weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
            shards = sorted({v for v in (weight_map or {}).values() if isinstance(v, str)})
            unsafe = [s for s in shards if not is_safe_name(s)]
            if unsafe:  # ../x or /x: a download there would land outside the cache
                raise IndexMismatch(index, unsafe, unsafe=True)
            missing = [s for s in shards if s not in every]
            if missing:
                raise IndexMismatch(index, missing)
            if shards:
                return [index, *shards]
        if single in top:
            return [single]
        # Un-indexed shards or unusual names; a PEFT adapter is not a model to merge.
        found = sorted(
            f for f in top
            if f.endswith(suffix) and f.startswith(prefix) and not f.startswith("adapter_model")
        )
        if found:
            return found
    return []


class IndexMismatch(Exception):
    def __init__(self, index: str, missing: list[str], unsafe: bool = False):
        super().__init__(index)
        self.index = index
        self.missing = missing
        self.unsafe = unsafe  # the names lead outside the repository


def escape_glob(name: str) -> str:
    # allow_patterns are fnmatch patterns; escape so each names exactly one file.
    return re.sub(r"([*?\[])", r"[\1]", name)
