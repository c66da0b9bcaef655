"""Stage products cut into chunks: the data is split into chunks of ``chunk_size`` consecutive
sequences, and every stage writes one file per chunk (``chunk-00012.safetensors``) as it goes.

A chunk is the unit of work, of memory and of resumption: the processes of a run share the
chunks (process r takes chunks r, r + n, ...), hold one at a time, and a re-run finds the chunks
already written and does only the others. The chunks do not depend on how many processes made
them, so one process and eight write the same files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import open_arrays, remove_stale_temporaries, save_arrays

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Layout:
    sequences: int
    chunk_size: int

    @property
    def chunks(self) -> int:
        return -(-self.sequences // self.chunk_size)

    def range(self, c: int) -> tuple[int, int]:
        return c * self.chunk_size, min(self.sequences, (c + 1) * self.chunk_size)

    def share(self, index: int, count: int) -> list[int]:
        """The chunks worker ``index`` of ``count`` takes."""
        return list(range(index, self.chunks, count))


class Store:
    """One stage product of one model (or pair): a folder of chunk files under one key."""

    def __init__(self, folder: Path, key: str, layout: Layout):
        self.folder, self.key, self.layout = Path(folder), key, layout

    def path(self, c: int) -> Path:
        return self.folder / f"chunk-{c:05d}.safetensors"

    def prepare(self) -> None:
        """Make the folder ready for this key (one process, before the others look): a folder
        made for other inputs is emptied; half-written files of an interrupted run are removed."""
        manifest = self.folder / MANIFEST
        try:
            same = json.loads(manifest.read_text()).get("key") == self.key
        except (OSError, ValueError):
            same = False
        if not same and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.folder)
        if not same:
            tmp = manifest.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"key": self.key, "sequences": self.layout.sequences,
                                       "chunk_size": self.layout.chunk_size}) + "\n")
            os.replace(tmp, manifest)

    def done(self, c: int) -> bool:
        return self.open(c) is not None

    def missing(self, chunks: list[int] | None = None) -> list[int]:
        return [c for c in (range(self.layout.chunks) if chunks is None else chunks) if not self.done(c)]

    def write(self, c: int, arrays: dict[str, np.ndarray]) -> None:
        save_arrays(self.path(c), arrays, self.key, chunk=str(c))

    def open(self, c: int) -> dict[str, np.ndarray] | None:
        return open_arrays(self.path(c), self.key)

    def require(self, c: int, what: str) -> dict[str, np.ndarray]:
        from ..api.errors import FusionError

        arrays = self.open(c)
        if arrays is None:
            raise FusionError(f"{what}: chunk {c} is missing from {self.folder} (removed or damaged during the run); "
                              f"run the command again to recompute it")
        return arrays


class Sequences:
    """Per-sequence views into one store's chunks (each chunk holds its sequences back to back,
    ``lengths`` long), memory-mapped and kept open for the most recently used chunks only."""

    def __init__(self, store: Store, what: str, lengths: np.ndarray | None = None, keep: int = 16):
        self.store, self.what, self.keep = store, what, keep
        self._open: OrderedDict[int, tuple[dict, np.ndarray]] = OrderedDict()
        self._lengths = lengths

    def chunk(self, c: int) -> tuple[dict, np.ndarray]:
        if c in self._open:
            self._open.move_to_end(c)
            return self._open[c]
        arrays = self.store.require(c, self.what)
        lengths = arrays["lengths"] if "lengths" in arrays else self._chunk_lengths(c)
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._open[c] = (arrays, starts)
        while len(self._open) > self.keep:
            self._open.popitem(last=False)
        return arrays, starts

    def _chunk_lengths(self, c: int) -> np.ndarray:
        a, b = self.store.layout.range(c)
        return self._lengths[a:b]

    def get(self, i: int, *names: str) -> list[np.ndarray]:
        c, local = divmod(int(i), self.store.layout.chunk_size)
        arrays, starts = self.chunk(c)
        s = slice(int(starts[local]), int(starts[local + 1]))
        return [arrays[n][s] for n in names]

    def column(self, name: str) -> np.ndarray:
        """A per-sequence array (``lengths``, ``ce``, ``targets``) over all chunks, in memory."""
        return np.concatenate([self.store.require(c, self.what)[name]
                               for c in range(self.store.layout.chunks)]) if self.store.layout.chunks else np.zeros(0)
