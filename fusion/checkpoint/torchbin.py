"""PyTorch ``pytorch_model.bin`` weights, single or sharded, unpickled with ``weights_only`` (a
pickle from the internet must never run code) and memory-mapped where the file allows."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from ..api.dtypes import from_name
from ..api.errors import CheckpointError
from .format import ShardedFormat, Storage, TensorInfo, read_weight_map


class StateDict(Storage):
    """Tensors of an unpickled state dict."""

    name = "bin"

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def read(self, info: TensorInfo, label: str):
        return self.state[info.name]

    def close(self) -> None:
        self.state.clear()


def _refusal(exc: BaseException) -> str:
    """The line of torch's message that says what was wrong (its refusals of a pickle span a
    paragraph that also suggests turning the safety off)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation"))
              and "weights_only" not in ln]
    return (useful or lines or [type(exc).__name__])[0].rstrip(".")


def _load(path: Path, label: str) -> dict[str, Any]:
    import pickle

    import torch

    try:
        # only the zip format (torch ≥ 1.6) can be memory-mapped; older files are read whole
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{label}: {path} holds Python objects besides tensors, which fusion never "
                              f"unpickles ({_refusal(exc)}); convert it to safetensors where you trust its "
                              f"source") from None
    except Exception as exc:
        raise CheckpointError(f"{label}: cannot read {path} ({_refusal(exc)}); it is damaged or not a "
                              f"PyTorch checkpoint: download or save it again") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{label}: {path} holds a {type(loaded).__name__}, not a state dict of tensors")
    for name, value in loaded.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{label}: {path} holds {name!r} of type {type(value).__name__} in its "
                                  f"state dict, where fusion reads tensors only; save the model again with "
                                  f"save_pretrained")
    return loaded


class TorchBin(ShardedFormat):
    index = "pytorch_model.bin.index.json"
    single = "pytorch_model.bin"

    @classmethod
    def open(cls, folder: Path, label: str) -> tuple[dict[str, TensorInfo], Storage, int]:
        path, sharded = cls.weights(folder, label)
        files = sorted(set(read_weight_map(path, label).values())) if sharded else [path]
        state: dict[str, Any] = {}
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{label}: shard {path.name} is missing; download the complete model")
            state.update(_load(path, label))
        tensors = {}
        for name, t in state.items():
            dt = from_name(t.dtype)
            if dt is None:
                raise CheckpointError(f"{label}: tensor {name!r} in {folder} has unsupported dtype {t.dtype}")
            tensors[name] = TensorInfo(name, dt.code, tuple(t.shape), files[0])
        return tensors, StateDict(state), 0
