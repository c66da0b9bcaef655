"""Reading checkpoints lazily: safetensors (single or sharded) and pytorch_model.bin.

Safetensors headers are parsed here, without torch, and validated against the file size, so
planning never touches the weights and a truncated or corrupt file is reported before any work.
Tensors are zero-copy views into a memory map; :meth:`Checkpoint.release` drops their pages from
the process once merged, which keeps resident memory flat however large the model is.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .api.dtypes import DTYPES, from_name, nbytes
from .api.errors import CheckpointError
from .api.resolver import HEADERS_FILE

MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    file: Path
    start: int = 0  # absolute byte offsets in `file` (safetensors)
    end: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


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


def _load_config(folder: Path, where: str) -> dict[str, Any]:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{where}: {folder} is not a model folder (no config.json); "
                              f"point to a folder saved with save_pretrained")
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: {cfg} is not valid JSON ({exc}); fix or re-download it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: {cfg} must hold a JSON object")
    return data


@dataclass
class Checkpoint:
    """An opened model folder: its config and a lazy view of its tensors."""

    folder: Path
    label: str  # how errors and the plan name this model, e.g. "models[1] (./ft)"
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    format: str  # "safetensors" | "bin" | "headers" (names and shapes only; nothing to read)
    download_bytes: int = 0  # what a merge would still download (header-only folders)
    _maps: dict[Path, mmap.mmap] = field(default_factory=dict, repr=False)
    _bin: dict[str, Any] = field(default_factory=dict, repr=False)

    def read(self, name: str):
        """The tensor as stored (dtype and shape), a read-only view where possible."""
        import torch

        info = self.tensors[name]
        if self.format == "bin":
            return self._bin[name]
        if self.format == "headers":
            raise CheckpointError(f"{self.label}: only the headers of its weights were fetched (for a plan "
                                  f"or dry run), so tensor {name!r} cannot be read; run the merge itself")
        dtype = getattr(torch, DTYPES[info.dtype].name)
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        mm = self._map(info.file)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the map is read-only and no one writes to it
            flat = torch.frombuffer(mm, dtype=dtype, count=info.numel, offset=info.start)
        return flat.view(info.shape)

    def raw(self, name: str) -> memoryview:
        """The tensor's stored bytes, a read-only view into the map (safetensors only)."""
        info = self.tensors[name]
        if info.end <= info.start:
            return memoryview(b"")
        return memoryview(self._map(info.file))[info.start:info.end]

    def buffer(self, name: str, numel: int | None = None):
        """The first ``numel`` elements (default all) as a :class:`fusion.api.kernels.Buffer` over
        the map, without torch (safetensors, in a dtype the C kernels read)."""
        from .api.kernels import from_bytes

        info = self.tensors[name]
        numel = info.numel if numel is None else numel
        return from_bytes(self.raw(name), DTYPES[info.dtype].name, numel)

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with open(file, "rb") as f:
                mm = self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return mm

    def prefetch(self, name: str) -> None:
        """Ask the OS to start reading the tensor's pages (a hint; nothing waits for it)."""
        info = self.tensors[name]
        if self.format != "safetensors" or not hasattr(mmap, "MADV_WILLNEED") or info.end <= info.start:
            return
        mm = self._map(info.file)
        start = info.start - info.start % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_WILLNEED, start, info.end - start)
        except (OSError, ValueError):
            pass

    def release(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Drop the pages of the tensor's bytes [begin, end) (all of them by default) from this
        process; they stay in the OS page cache, so a later read costs a page fault, not I/O."""
        info = self.tensors[name]
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
        self._bin.clear()


def open_checkpoint(folder: Path, label: str) -> Checkpoint:
    """Open a model folder: config.json plus safetensors (preferred) or pytorch_model.bin."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"{label}: {folder} does not exist; check the path")
    if not folder.is_dir():
        raise CheckpointError(f"{label}: {folder} is a file, not a model folder; give the folder that holds config.json")
    config = _load_config(folder, label)
    if (folder / HEADERS_FILE).is_file():
        return _open_headers(folder, label, config)
    st_index = folder / "model.safetensors.index.json"
    if st_index.is_file():
        tensors = _from_index(st_index, label)
        return Checkpoint(folder, label, config, tensors, "safetensors")
    single = folder / "model.safetensors"
    if single.is_file():
        return Checkpoint(folder, label, config, read_safetensors_header(single), "safetensors")
    bin_index = folder / "pytorch_model.bin.index.json"
    bins = [folder / "pytorch_model.bin"] if (folder / "pytorch_model.bin").is_file() else []
    if bin_index.is_file() or bins:
        return _open_bin(folder, label, config, bin_index if bin_index.is_file() else None, bins)
    raise CheckpointError(
        f"{label}: {folder} has no weights (model.safetensors, model.safetensors.index.json or "
        f"pytorch_model.bin); point to a complete model folder"
    )


def _read_index(index: Path, label: str) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{label}: {index} is not a valid index (JSON with a weight_map); "
                              f"download or save the model again") from None
    return weight_map


def _from_index(index: Path, label: str) -> dict[str, TensorInfo]:
    weight_map = _read_index(index, label)
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


def _open_bin(folder: Path, label: str, config: dict, index: Path | None, bins: list[Path]) -> Checkpoint:
    import torch

    files = sorted({folder / f for f in _read_index(index, label).values()}) if index else bins
    state: dict[str, Any] = {}
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{label}: shard {path.name} is missing; download the complete model")
        try:
            # weights_only: a pickle from the internet must never run code
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
    ckpt = Checkpoint(folder, label, config, tensors, "bin")
    ckpt._bin = state
    return ckpt


def _open_headers(folder: Path, label: str, config: dict) -> Checkpoint:
    path = folder / HEADERS_FILE
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        download = int(manifest.get("download_bytes", 0))
        if not isinstance(files, dict) or not files:
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{label}: {path} is damaged; delete {folder} and run again") from None
    tensors: dict[str, TensorInfo] = {}
    for name, entry in files.items():
        try:
            size, header = int(entry["size"]), entry["header"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{label}: {path} is damaged; delete {folder} and run again") from None
        # The remote file is 8 length bytes, the header, then exactly the data the header describes.
        data_size = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"
                         and isinstance(e, dict) and isinstance(e.get("data_offsets"), list)), default=0)
        tensors.update(parse_header(header, folder / name, data_start=size - data_size, data_size=data_size))
    return Checkpoint(folder, label, config, tensors, "headers", download_bytes=download)
