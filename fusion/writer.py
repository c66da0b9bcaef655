"""Writing the output: an atomic output folder and a streaming sharded safetensors writer.

The plan knows every output tensor's name, dtype and shape before anything is computed, so the
shards and their headers are laid out up front and each tensor is written the moment it is
merged: nothing is held back to be written later.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from .api.dtypes import DTYPES, nbytes
from .api.errors import FusionError, os_error
from .api.modelfiles import model_root, support_files
from .api.resolver import expand_user


def parse_size(text: str | int) -> int:
    """'5GB' → 5·10⁹ bytes (decimal units as transformers uses; GiB/MiB are binary)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    unit = next((u for u in units if s.endswith(u)), None)
    number, factor = (s[: -len(unit)], units[unit]) if unit else (s, 1)
    try:
        value = int(float(number) * factor)
    except (ValueError, OverflowError):  # not a number, nan, or too large (1e400GB)
        value = 0
    if value <= 0:
        raise FusionError(f"shard size {text!r} is not a size; use e.g. 5GB, 500MB or a number of bytes")
    return value


@contextmanager
def atomic_folder(target: Path, force: bool, notes: list[str] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` that becomes ``target`` only on success.

    While it is written, the output is claimed (a lock beside it) so that a second run into the
    same folder refuses instead of replacing the first one's result. The claim also tells that
    temporary folders of ``target`` found on the way in belong to runs that died (killed, power
    lost): they are removed, and ``notes`` says so. On failure nothing is left, not even parent
    folders this call created; an OS error a user can fix (disk full, read-only) is one sentence.
    """
    target = Path(target).absolute()
    refuse_existing(target, force)
    created = _make_parents(target.parent)
    try:
        with _claim(target):
            refuse_existing(target, force)  # another run may have finished it meanwhile
            _clean_leftovers(target, notes)
            tmp = target.parent / f".{target.name}.fusion-tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                yield tmp
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.fusion-old-{uuid.uuid4().hex[:8]}"
                os.rename(target, old)
            os.rename(tmp, target)
            if old is not None:  # renamed first: a half-removed folder is never taken for the old output
                trash = old.with_name(old.name.replace(".fusion-old-", ".fusion-trash-"))
                os.rename(old, trash)
                shutil.rmtree(trash, ignore_errors=True)
    except BaseException as exc:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: someone else uses it
        error = os_error(exc, f"cannot write the output folder {target}", "or choose another -o")
        if error is not None:
            raise error from exc
        raise


def output_folder(output: str | Path) -> Path:
    """The output folder ``-o`` names, ``~`` expanded; an empty name (an unset variable in
    ``-o "$OUT"``) is refused rather than taken for the working folder."""
    if not str(output).strip():
        raise FusionError("the output folder is an empty name; give -o the folder to write")
    return expand_user(output, "output folder")


def refuse_existing(target: Path, force: bool) -> None:
    """Refuse an output folder that exists and is not empty, unless ``force``."""
    target = Path(target).absolute()
    if target.exists() and not (target.is_dir() and not any(target.iterdir())) and not force:
        raise FusionError(f"output folder {target} already exists and is not empty; "
                          f"choose another -o or pass --force to replace it")


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    missing.reverse()
    for i, p in enumerate(missing):
        try:
            p.mkdir()
        except FileExistsError:
            continue
        except BaseException:
            for q in reversed(missing[:i]):
                shutil.rmtree(q, ignore_errors=True)
            raise
    return missing


@contextmanager
def _claim(target: Path) -> Iterator[None]:
    """Hold ``.NAME.fusion-lock`` beside ``target`` for the block, or refuse: another run is
    writing ``target``. The OS drops the lock when its process dies, however it dies."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: no claim
        yield
        return
    lock = target.parent / f".{target.name}.fusion-lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            by = f" (process {holder})" if holder.isdigit() else ""
            raise FusionError(f"output folder {target} is being written by another fusion run{by}; wait "
                              f"for it to finish or choose another -o") from None
        try:  # its previous holder may have removed the file after it was opened here
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(lock)
        finally:
            os.close(fd)


def _clean_leftovers(target: Path, notes: list[str] | None) -> None:
    """Remove what runs into ``target`` that died left: their temporary folders and, when one
    died while replacing ``target``, put the previous output back first. Only a run that holds
    the claim calls this, so no live run owns them."""
    prefix = f".{target.name}.fusion-"
    leftovers = sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix)
                       and p.name[len(prefix):].startswith(("tmp-", "old-", "trash-")))
    olds = [p for p in leftovers if p.name[len(prefix):].startswith("old-")]
    if olds and not target.exists():  # died between the two renames of a --force replace
        os.rename(olds[0], target)
        leftovers.remove(olds[0])
    for p in leftovers:
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(p, ignore_errors=True)
        if notes is not None:
            notes.append(f"removed {p} ({size / 1e6:,.1f} MB), left by an earlier run into {target} "
                         f"that did not finish")


class ShardedWriter:
    """Writes planned tensors, in plan order, into transformers-named safetensors shards."""

    def __init__(self, folder: Path, entries: Sequence[tuple[str, str, tuple[int, ...]]], shard_size: int):
        self.folder = Path(folder)
        shards: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
        used = 0
        for name, dtype, shape in entries:
            n = nbytes(dtype, shape)
            if shards[-1] and used + n > shard_size:
                shards.append([])
                used = 0
            shards[-1].append((name, dtype, tuple(shape), n))
            used += n
        count = len(shards)
        self.files = ["model.safetensors"] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)
        ]
        self.order: list[tuple[int, str, str, tuple[int, ...], int]] = []
        self.headers: list[bytes] = []
        self.total_size = 0
        for i, shard in enumerate(shards):
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, dtype, shape, n in shard:
                header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
                offset += n
                self.order.append((i, name, dtype, shape, n))
            self.total_size += offset
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
            self.headers.append(len(raw).to_bytes(8, "little") + raw)
        self._next = 0
        self._file = None
        self._shard = -1

    def write(self, name: str, tensor) -> None:
        """Write the next tensor: a torch tensor, or its raw bytes (any buffer, e.g. a memoryview
        or numpy array) in the planned dtype and row-major order."""
        shard, expected, dtype, shape, n = self.order[self._next]
        if name != expected:
            raise RuntimeError(f"tensor {name} written out of plan order (expected {expected})")
        raw = not hasattr(tensor, "element_size")
        if raw:
            tensor = memoryview(tensor).cast("B")
            if tensor.nbytes != n:
                raise RuntimeError(f"tensor {name} has {tensor.nbytes} bytes, planned {n}")
        elif tuple(tensor.shape) != shape or str(tensor.dtype).removeprefix("torch.") != DTYPES[dtype].name:
            raise RuntimeError(f"tensor {name} is {tensor.dtype} {list(tensor.shape)}, planned {dtype} {list(shape)}")
        try:
            if shard != self._shard:
                self._close()
                self._shard = shard
                self._file = open(self.folder / self.files[shard], "wb")
                self._file.write(self.headers[shard])
            if n and raw:
                self._file.write(tensor)
            elif n:
                flat = tensor.contiguous().reshape(-1)
                import torch

                self._file.write(flat.view(torch.uint8).numpy().data)
        except OSError as exc:  # a write says no file name: name the shard for the message
            exc.filename = exc.filename or str(self.folder / self.files[shard])
            raise
        self._next += 1

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> list[str]:
        """Close the last shard, write the index when sharded; return the weight files."""
        self._close()
        if self._next != len(self.order):
            raise RuntimeError(f"only {self._next} of {len(self.order)} planned tensors were written")
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {name: self.files[shard] for shard, name, *_ in self.order},
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return list(self.files)


def copy_support_files(source: Path, folder: Path, exclude: Sequence[str] = ("config.json",),
                       label: str | None = None) -> list[str]:
    """Copy the model files besides the weights (tokenizer, processor, generation config, chat
    templates) from the model folder ``source`` into ``folder``; return what was copied. A file
    that leads outside ``source`` is refused (``label`` names the model in the message)."""
    copied = []
    for name in support_files(source, label):
        if name in exclude:
            continue
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, folder / name)
        copied.append(name)
    return copied


def write_config(folder: Path, config: dict, dtype: str | None = None) -> None:
    """``config.json``, with its dtype entry set to ``dtype`` (a torch dtype name) when given."""
    config = dict(config)
    if dtype:
        # transformers 5 writes "dtype", older versions "torch_dtype": update what is there
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            config[key] = dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def check_output(output: Path, inputs: Sequence[tuple[str, Path]], files: Sequence[tuple[str, Path]] = ()) -> None:
    """Never write into, or replace, an input model's folder (``inputs``: label and folder; the
    whole Hugging Face cache repository of a snapshot) or a folder that holds one of ``files``
    (what and path, e.g. the config file, which --force would delete with the old output)."""
    out = Path(output).absolute().resolve()
    for label, folder in inputs:
        for folder in dict.fromkeys((Path(folder).resolve(), model_root(folder))):
            if out == folder or folder in out.parents or out in folder.parents:
                raise FusionError(f"output folder {output} overlaps the input model {label}; "
                                  f"inputs are never modified: choose another -o")
    for what, path in [*files, ("working folder", Path.cwd())]:
        path = Path(path).resolve()
        if out == path or out in path.parents:
            raise FusionError(f"output folder {output} holds the {what} {path}, which replacing the folder "
                              f"would delete; choose another -o")
