"""Header-only model folders (:func:`fusion.api.resolver.write_header_folder`): the names,
dtypes and shapes of a Hub model's tensors, fetched for a plan without the weights."""

from __future__ import annotations

import json
from pathlib import Path

from ..api.errors import CheckpointError
from ..api.resolver import HEADERS_FILE
from .format import Format, Storage, TensorInfo
from .safetensors import parse_header


class NoData(Storage):
    name = "headers"

    def read(self, info: TensorInfo, label: str):
        raise CheckpointError(f"{label}: only the headers of its weights were fetched (for a plan "
                              f"or dry run), so tensor {info.name!r} cannot be read; run the merge itself")


class HeaderFolder(Format):
    @classmethod
    def recognises(cls, folder: Path) -> bool:
        return (folder / HEADERS_FILE).is_file()

    @classmethod
    def open(cls, folder: Path, label: str) -> tuple[dict[str, TensorInfo], Storage, int]:
        path = folder / HEADERS_FILE
        damaged = CheckpointError(f"{label}: {path} is damaged; delete {folder} and run again")
        try:
            manifest = json.loads(path.read_text())
            files = manifest["files"]
            download = int(manifest.get("download_bytes", 0))
            if not isinstance(files, dict) or not files:
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise damaged from None
        tensors: dict[str, TensorInfo] = {}
        for name, entry in files.items():
            try:
                size, header = int(entry["size"]), entry["header"]
            except (KeyError, TypeError, ValueError):
                raise damaged from None
            # The remote file is 8 length bytes, the header, then exactly the data the header describes.
            data_size = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"
                             and isinstance(e, dict) and isinstance(e.get("data_offsets"), list)), default=0)
            tensors.update(parse_header(header, folder / name, data_start=size - data_size, data_size=data_size))
        return tensors, NoData(), download
