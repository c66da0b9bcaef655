"""Header-only model folders (:func:`fusion.api.resolver.write_header_folder`): the names,
dtypes and shapes of a Hub model's tensors, fetched for a plan without the weights."""

from __future__ import annotations

from pathlib import Path

from ..api.errors import CheckpointError
from ..api.modelfiles import contained, load_json
from ..api.resolver import HEADERS_FILE
from .format import Format, Storage, TensorInfo
from .safetensors import data_extent, parse_header


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
        path = contained(folder, HEADERS_FILE, label)
        damaged = CheckpointError(f"{label}: {path} is damaged; delete {folder} and run again")
        manifest = load_json(path, label)
        files = manifest.get("files") if isinstance(manifest, dict) else None
        download = manifest.get("download_bytes", 0) if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or not files or type(download) is not int:
            raise damaged
        tensors: dict[str, TensorInfo] = {}
        for name, entry in files.items():
            size = entry.get("size") if isinstance(entry, dict) else None
            if type(size) is not int or not isinstance(entry.get("header"), dict):
                raise damaged
            header = entry["header"]
            # The remote file is 8 length bytes, the header, then exactly the data the header describes.
            data_size = data_extent(header)
            tensors.update(parse_header(header, contained(folder, name, label),
                                        data_start=size - data_size, data_size=data_size))
        return tensors, NoData(), download
