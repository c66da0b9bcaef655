"""Reading checkpoints lazily: one model folder's config and a view of its tensors.

A folder's weights are in one of the formats of :data:`FORMATS` (small classes, one per module):
safetensors (single or sharded), PyTorch ``.bin`` (single or sharded, unpickled with
``weights_only``), or the header-only folders a resolver writes for a plan. Planning reads only
names, dtypes and shapes; tensors are read when merged, as zero-copy views where the format
allows, and :meth:`Checkpoint.release` drops their pages once merged, which keeps resident
memory flat however large the model is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..api.dtypes import DTYPES
from ..api.errors import CheckpointError
from ..api.modelfiles import contained, load_json
from .format import Storage, TensorInfo
from .headers import HeaderFolder
from .safetensors import Safetensors, read_safetensors_header
from .torchbin import TorchBin

__all__ = ["FORMATS", "Checkpoint", "TensorInfo", "open_checkpoint", "read_safetensors_header"]

#: The weight formats, in the order a folder is tried against them.
FORMATS = (HeaderFolder, Safetensors, TorchBin)


@dataclass
class Checkpoint:
    """An opened model folder: its config and a lazy view of its tensors."""

    folder: Path
    label: str  # how errors and the plan name this model, e.g. "models[1] (./ft)"
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    storage: Storage
    download_bytes: int = 0  # what a merge would still download (header-only folders)

    @property
    def format(self) -> str:
        """``safetensors``, ``bin`` or ``headers`` (names and shapes only; nothing to read)."""
        return self.storage.name

    def read(self, name: str):
        """The tensor as stored (dtype and shape), a read-only view where possible."""
        return self.storage.read(self.tensors[name], self.label)

    def raw(self, name: str) -> memoryview:
        """The tensor's stored bytes, a read-only view into the file (safetensors only)."""
        return self.storage.raw(self.tensors[name])

    def buffer(self, name: str, numel: int | None = None):
        """The first ``numel`` elements (default all) as a :class:`fusion.api.kernels.Buffer` over
        the file, without torch (safetensors, in a dtype the C kernels read)."""
        from ..api.kernels import from_bytes

        info = self.tensors[name]
        numel = info.numel if numel is None else numel
        return from_bytes(self.raw(name), DTYPES[info.dtype].name, numel)

    def prefetch(self, name: str) -> None:
        """Ask the OS to start reading the tensor's pages (a hint; nothing waits for it)."""
        self.storage.prefetch(self.tensors[name])

    def release(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Drop the pages of the tensor's bytes [begin, end) (all of them by default) from this
        process; they stay in the OS page cache, so a later read costs a page fault, not I/O."""
        self.storage.release(self.tensors[name], begin, end)

    def close(self) -> None:
        self.storage.close()


def _load_config(folder: Path, where: str) -> dict[str, Any]:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{where}: {folder} is not a model folder (no config.json); "
                              f"point to a folder saved with save_pretrained")
    data = load_json(contained(folder, "config.json", where), where)
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: {cfg} must hold a JSON object")
    # the keys fusion itself reads to recognise the architecture
    arch = data.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise CheckpointError(f"{where}: {cfg} has architectures {arch!r}, not a list of class names "
                              f"such as [\"Qwen2ForCausalLM\"]; fix config.json")
    model_type = data.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise CheckpointError(f"{where}: {cfg} has model_type {model_type!r}, not a name such as \"qwen2\"; "
                              f"fix config.json")
    return data


def open_checkpoint(folder: Path, label: str) -> Checkpoint:
    """Open a model folder: config.json plus weights in one of :data:`FORMATS`."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"{label}: {folder} does not exist; check the path")
    if not folder.is_dir():
        raise CheckpointError(f"{label}: {folder} is a file, not a model folder; give the folder that holds config.json")
    config = _load_config(folder, label)
    for fmt in FORMATS:
        if fmt.recognises(folder):
            tensors, storage, download = fmt.open(folder, label)
            return Checkpoint(folder, label, config, tensors, storage, download)
    raise CheckpointError(
        f"{label}: {folder} has no weights (model.safetensors, model.safetensors.index.json or "
        f"pytorch_model.bin); point to a complete model folder"
    )
