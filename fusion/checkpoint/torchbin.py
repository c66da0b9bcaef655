"""PyTorch ``pytorch_model.bin`` weights, single or sharded, unpickled with ``weights_only`` (a
pickle from the internet must never run code) and memory-mapped where the file allows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..api.dtypes import from_name
from ..api.errors import CheckpointError
from .format import Format, Storage, TensorInfo, read_weight_map

INDEX = "pytorch_model.bin.index.json"
SINGLE = "pytorch_model.bin"


class StateDict(Storage):
    """Tensors of an unpickled state dict."""

    name = "bin"

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def read(self, info: TensorInfo, label: str):
        return self.state[info.name]

    def close(self) -> None:
        self.state.clear()


class TorchBin(Format):
    @classmethod
    def recognises(cls, folder: Path) -> bool:
        return (folder / INDEX).is_file() or (folder / SINGLE).is_file()

    @classmethod
    def open(cls, folder: Path, label: str) -> tuple[dict[str, TensorInfo], Storage, int]:
        import torch

        index = folder / INDEX
        files = sorted({folder / f for f in read_weight_map(index, label).values()}) if index.is_file() \
            else [folder / SINGLE]
        state: dict[str, Any] = {}
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{label}: shard {path.name} is missing; download the complete model")
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise CheckpointError(f"{label}: cannot load {path} safely ({type(exc).__name__}: {exc}); "
                                      f"convert it to safetensors") from None
            if not isinstance(loaded, dict):
                raise CheckpointError(f"{label}: {path} does not hold a state dict")
            state.update(loaded)
        tensors = {}
        for name, t in state.items():
            dt = from_name(t.dtype)
            if dt is None:
                raise CheckpointError(f"{label}: tensor {name!r} in {folder} has unsupported dtype {t.dtype}")
            tensors[name] = TensorInfo(name, dt.code, tuple(t.shape), files[0])
        return tensors, StateDict(state), 0
