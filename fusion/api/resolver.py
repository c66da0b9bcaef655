"""The resolver contract: what a ``resolve_model`` hook is given, and the header-only folders a
resolver may return for a plan."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import FusionError

#: Marks a header-only model folder (see :func:`write_header_folder`).
HEADERS_FILE = "fusion-headers.json"


@dataclass
class ResolveOptions:
    """What resolvers get besides the reference.

    ``base_dir`` is the folder relative paths are taken from (the config file's folder).
    ``offline`` forbids network access; ``cache_dir`` overrides the download cache;
    ``resolved`` is filled by resolvers with what they pinned (reference → commit) so the output
    can record it. ``weights`` is false when only tensor names, dtypes and shapes are needed
    (``fusion plan``, ``merge --dry-run``): a resolver may then return a header-only folder
    (:func:`write_header_folder`) instead of downloading the weights.
    """

    base_dir: Path = field(default_factory=Path.cwd)
    offline: bool = False
    cache_dir: str | None = None
    weights: bool = True
    resolved: dict = field(default_factory=dict)


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?\Z")


def expand_user(path: str | Path, what: str = "path") -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded; a FusionError (naming ``what``) when
    there is no such user or home folder."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        head = str(path).split("/", 1)[0]
        who = f"user {head[1:]!r}" if len(head) > 1 else "home folder (HOME is not set)"
        raise FusionError(f"{what} {str(path)!r} starts with {head}, but there is no such {who}; give the "
                          f"path without ~ or check the name") from None


def looks_like_hub_name(reference: str) -> bool:
    """``org/name`` or ``org/name@revision``; anything else is a filesystem path."""
    return bool(_HUB_NAME.match(reference))


def write_header_folder(folder: Path, config: Mapping[str, Any], files: Mapping[str, tuple[int, dict]], *,
                        source: str, download_bytes: int) -> Path:
    """Write a header-only model folder: ``config.json`` plus the safetensors headers of the
    weight files (``files`` maps a file name to its size in bytes and its decoded header).

    A resolver asked for names and shapes only (``ResolveOptions.weights`` false: ``fusion plan``,
    ``merge --dry-run``) may return such a folder instead of downloading the weights; fusion then
    plans from it and reports ``download_bytes`` as what the merge itself would fetch. The folder
    is written next to its final place and renamed, so a reader never sees half of it.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")
    manifest = {"source": source, "download_bytes": download_bytes,
                "files": {name: {"size": size, "header": header} for name, (size, header) in files.items()}}
    (tmp / HEADERS_FILE).write_text(json.dumps(manifest) + "\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process wrote the same folder first: the content is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
